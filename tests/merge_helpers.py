"""Run a merge of in-memory tensors through the real config -> plan -> engine path, with a chosen chunk size."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from helpers import merge_in_process, save


def write_models(tmp: Path, models: list[dict], base: dict | None = None) -> tuple[list[Path], Path | None]:
    paths = []
    for i, tensors in enumerate(models):
        paths.append(save(tensors, tmp / f"model{i}.safetensors"))
    base_path = save(base, tmp / "base.safetensors") if base is not None else None
    return paths, base_path


def run_merge(tmp: Path, method: str, models: list[dict], base: dict | None = None, model_params=None,
              chunk: int | None = None, output: str = "out.safetensors", engine_options: dict | None = None,
              **top) -> dict:
    """Merge with `method`; model_params: one dict per model; top: other config keys (parameters, rules...);
    engine_options: Engine keyword arguments."""
    tmp.mkdir(parents=True, exist_ok=True)
    paths, base_path = write_models(tmp, models, base)
    model_params = model_params or [{} for _ in models]
    config = {"method": method, "models": [{"path": str(p), **mp} for p, mp in zip(paths, model_params)],
              "output": str(tmp / output), **top}
    if base_path is not None:
        config["base"] = str(base_path)
    merge_in_process(config, chunk=chunk, **(engine_options or {}))
    return load_file(tmp / output)
