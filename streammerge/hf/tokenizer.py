"""The output tokenizer and where each of its tokens' embedding rows comes from, as mergekit defines them.

`tokenizer_source: base | union | PATH` (or `tokenizer: {source, tokens, pad_to_multiple_of}`):
- `base`: the donor model's tokenizer (the base model, else the first), tokens beyond its `vocab_size` dropped;
  `union`: the donor's tokenizer plus every other model's tokens it lacks, in model order (added tokens last);
  a path: that model's tokenizer. `tokens` adds tokens and chooses their rows; `pad_to_multiple_of` pads the
  vocabulary (the padding rows are each model's mean row).
- Every model's vocabulary-indexed tensors (embedding, output embedding) are read through the output
  vocabulary: a token the model has is its own row. A token it lacks (or one `force`d) takes a default row:
  the only model that has it; else the base model's row when it has it; else the mean over the models that
  have it; a `tokens` entry can name a model, a model's token (`kind: model_token`) or zeros (`kind: zero`).
  Merging these rows with the method gives, for a token one model has, that model's row (with normalized
  weights: the weights renormalized over the models that have it).
Tokens are matched by their text. Only the `tokenizers` package is needed, and only when a tokenizer is asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streammerge.errors import ConfigError

SOURCES = ("base", "union")
BUILTIN_CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
    "llama3": ("{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + "
               "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% set system = messages[0]['content'] if messages and messages[0]['role'] == "
                "'system' else none %}{% for message in messages if message['role'] != 'system' %}"
                "{% if message['role'] == 'user' %}{{ ' [INST] ' + (system + '\\n\\n' if loop.first and system else "
                "'') + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"),
    "alpaca": ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] | trim + "
               "'\\n\\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim + "
               "'\\n\\n' }}{% elif message['role'] == 'user_context' %}{{ '### Input:\\n' + message['content'] | "
               "trim + '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + "
               "message['content'] | trim + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt and "
               "messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"),
    "exaone": ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
               "{{ '[|system|][|endofturn|]\\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
               "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
               "{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"),
}


# -- the config --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenSource:
    kind: str  # "model": that model's row for the token; "model_token": a given token of a model; "zero"
    model: str | None = None
    token_id: int | None = None
    token: str | None = None


@dataclass(frozen=True)
class TokenSpec:
    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    source: str  # "base", "union" or a model path
    tokens: dict[str, TokenSpec] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


def parse_tokenizer(value, where: str, resolve_model=str) -> TokenizerSpec:
    """`tokenizer_source` (a string) or `tokenizer` (a mapping) as mergekit spells them; `resolve_model` turns a
    model reference into a local path."""
    if isinstance(value, str):
        value = {"source": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'tokenizer' must be base, union, a model path, or a mapping of source, tokens "
                          "and pad_to_multiple_of.")
    unknown = set(value) - {"source", "tokens", "pad_to_multiple_of"}
    if unknown:
        raise ConfigError(f"{where}: tokenizer: unknown key '{sorted(unknown)[0]}' (allowed: source, tokens, "
                          "pad_to_multiple_of).")
    source = value.get("source", "union")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{where}: tokenizer source must be base, union or a model path.")
    if source not in SOURCES:
        source = resolve_model(source, f"{where}: tokenizer source")
    pad = value.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise ConfigError(f"{where}: tokenizer: pad_to_multiple_of must be a positive integer, not {pad!r}.")
    tokens = value.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise ConfigError(f"{where}: tokenizer: tokens must map each token to {{source: ..., force: ...}}.")
    parsed = {str(t): _parse_token(t, spec, f"{where}: tokenizer.tokens[{t!r}]", resolve_model)
              for t, spec in tokens.items()}
    return TokenizerSpec(str(source), parsed, pad)


def _parse_token(token, spec, where: str, resolve_model) -> TokenSpec:
    spec = {} if spec is None else spec
    if not isinstance(spec, dict) or set(spec) - {"source", "force"}:
        raise ConfigError(f"{where}: give {{source: MODEL | {{kind: zero}} | {{kind: model_token, model: MODEL, "
                          "token: TEXT | token_id: N}}, force: BOOL}}.")
    force = spec.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"{where}: force must be true or false.")
    source = spec.get("source")
    if source is None:
        return TokenSpec(None, force)
    if isinstance(source, str):
        return TokenSpec(TokenSource("model", resolve_model(source, where)), force)
    if not isinstance(source, dict) or source.get("kind") not in ("zero", "model_token"):
        raise ConfigError(f"{where}: source must be a model, {{kind: zero}} or {{kind: model_token, ...}}.")
    if source["kind"] == "zero":
        if set(source) != {"kind"}:
            raise ConfigError(f"{where}: {{kind: zero}} takes nothing else.")
        return TokenSpec(TokenSource("zero"), force)
    if set(source) - {"kind", "model", "token_id", "token"} or not source.get("model"):
        raise ConfigError(f"{where}: {{kind: model_token}} needs model and one of token, token_id.")
    if (source.get("token_id") is None) == (source.get("token") is None):
        raise ConfigError(f"{where}: {{kind: model_token}} needs exactly one of token and token_id.")
    token_id = source.get("token_id")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int)):
        raise ConfigError(f"{where}: token_id must be an integer.")
    return TokenSpec(TokenSource("model_token", resolve_model(str(source["model"]), where), token_id,
                                 None if source.get("token") is None else str(source["token"])), force)


def chat_template_text(value: str, where: str) -> str:
    """A built-in template name or a Jinja template, as mergekit takes `chat_template` ('auto' is resolved
    from the models' tokenizers by the caller)."""
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    if "{" not in value:
        raise ConfigError(f"{where}: chat_template '{value:.60}' is neither a built-in name "
                          f"({', '.join(sorted(BUILTIN_CHAT_TEMPLATES))}, auto) nor a Jinja template.")
    return value


# -- tokenizers -------------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
# The files of slow (Python) tokenizers, which a tokenizer merge cannot read, and what they are.
SLOW_TOKENIZER_FILES = {"tokenizer.model": "SentencePiece", "spiece.model": "SentencePiece",
                        "vocab.json": "byte-level BPE (with merges.txt)", "vocab.txt": "WordPiece"}


def _no_fast_tokenizer(directory: Path, where: str) -> str:
    slow = [f"{name} ({kind})" for name, kind in SLOW_TOKENIZER_FILES.items() if (directory / name).is_file()]
    has = (f"has only a slow tokenizer ({', '.join(slow)}) and no tokenizer.json" if slow
           else "has no tokenizer (no tokenizer.json)")
    return (f"{where}: '{directory}' {has}. A tokenizer merge (tokenizer_source / tokenizer) reads the fast "
            "tokenizer file tokenizer.json of every model it takes tokens from. Write one once with transformers: "
            "`AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)` (converting a SentencePiece model needs the "
            "sentencepiece and protobuf packages); or leave the tokenizer as it is (no tokenizer_source), or take "
            "it from a model that has tokenizer.json (tokenizer_source: MODEL).")


class FastTokenizer:
    """A model's fast tokenizer: `tokenizer.json` through the `tokenizers` library, and `tokenizer_config.json`
    as JSON. (transformers would do the same but costs about 90 MiB of RAM, most of a small merge budget.)"""

    def __init__(self, directory: Path, backend, config: dict):
        self.directory = Path(directory)
        self.backend = backend
        self.config = config

    @staticmethod
    def load(directory: Path, where: str) -> "FastTokenizer":
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise ConfigError(_no_fast_tokenizer(directory, where))
        try:
            import tokenizers
        except ImportError:
            raise ConfigError(f"{where}: a tokenizer merge needs the tokenizers package: pip install "
                              "'streammerge[hf]'.") from None
        try:
            backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
            config_path = directory / "tokenizer_config.json"
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except Exception as exc:  # tokenizers raises plain Exceptions for unreadable files
            raise ConfigError(f"{where}: cannot read the tokenizer in '{directory}' ({exc}).") from None
        return FastTokenizer(directory, backend, config if isinstance(config, dict) else {})

    def copy(self) -> "FastTokenizer":
        import tokenizers

        return FastTokenizer(self.directory, tokenizers.Tokenizer.from_str(self.backend.to_str()), dict(self.config))

    def vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def added(self) -> dict[int, object]:
        return dict(sorted(self.backend.get_added_tokens_decoder().items()))

    def add(self, token) -> None:
        """Add a token (text, or an AddedToken keeping its settings) at the end of the vocabulary, as
        transformers' add_tokens does; a token already there keeps its id."""
        import tokenizers

        if isinstance(token, str):
            token = tokenizers.AddedToken(token, normalized=True, special=False)
        (self.backend.add_special_tokens if token.special else self.backend.add_tokens)([token])

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: [{name, template}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja = self.directory / "chat_template.jinja"
        return jinja.read_text(encoding="utf-8") if jinja.is_file() else template

    def files(self, chat_template: str | None = None) -> dict[str, bytes]:
        """The tokenizer's files: tokenizer.json and tokenizer_config.json as they now are, the others copied."""
        out = {n: (self.directory / n).read_bytes() for n in TOKENIZER_FILES if (self.directory / n).is_file()}
        out["tokenizer.json"] = self.backend.to_str(pretty=True).encode()
        config = dict(self.config)
        if isinstance(config.get("added_tokens_decoder"), dict):  # transformers 4 lists added tokens here too
            config["added_tokens_decoder"] = {
                str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                         "single_word": t.single_word, "special": t.special} for i, t in self.added().items()}
        if chat_template is not None:
            config["chat_template"] = chat_template
            out["chat_template.jinja"] = chat_template.encode()
            out.pop("chat_template.json", None)
        out["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
        return out


# -- building the vocabulary -------------------------------------------------------------------------------
@dataclass
class RowSources:
    """For one model: the output vocabulary's rows by where they come from."""

    own: np.ndarray  # output row -> the model's own row, or -1 where the row is a default
    defaults: dict[int, list[tuple[int, int]]]  # output row -> (model index, row) averaged; [] = zeros
    padded_rows: int  # output rows (vocabulary padded to pad_to_multiple_of)
    real_rows: int  # rows that are tokens; the rest are padding (the model's mean row)


@dataclass
class Vocabulary:
    tokenizer: FastTokenizer  # the output tokenizer
    size: int  # rows of the output embedding, padded
    rows: list[RowSources]  # per model
    model_vocab_sizes: list[int]
    warnings: list[str] = field(default_factory=list)


def _stripped(tokenizer: FastTokenizer, vocab_size: int, where: str) -> FastTokenizer:
    """The tokenizer without tokens whose id is beyond the model's embedding (BPE and word-level models)."""
    unused = [t for t, i in tokenizer.vocab().items() if i >= vocab_size]
    if not unused:
        return tokenizer
    import tokenizers

    data = json.loads(tokenizer.backend.to_str())
    if data["model"]["type"] not in ("BPE", "WordLevel"):
        raise ConfigError(f"{where}: the tokenizer of '{tokenizer.directory}' has {len(unused)} token(s) beyond its "
                          f"vocab_size ({vocab_size}) and is a {data['model']['type']} model, which cannot be "
                          "trimmed; use another tokenizer source.")
    unused_set = set(unused)
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < vocab_size]
    for token in unused:
        data["model"]["vocab"].pop(token, None)
    if data["model"]["type"] == "BPE":
        data["model"]["merges"] = [m for m in data["model"]["merges"]
                                   if not set(m.split(" ") if isinstance(m, str) else m) & unused_set]
    return FastTokenizer(tokenizer.directory, tokenizers.Tokenizer.from_str(json.dumps(data)), dict(tokenizer.config))


def _union(donor: FastTokenizer, tokenizers: list[FastTokenizer], vocab_sizes: list[int]) -> FastTokenizer:
    """The donor's tokenizer plus every other model's tokens it lacks: plain tokens in model order and, within a
    model, id order (mergekit takes them in hash order, which changes from run to run), then added tokens
    (first settings win)."""
    plain: dict[str, None] = {}
    added: dict[str, object] = {}
    for tokenizer, size in zip(tokenizers, vocab_sizes):
        added_here = tokenizer.added()
        added_text = {info.content for info in added_here.values()}
        for token, index in sorted(tokenizer.vocab().items(), key=lambda item: item[1]):
            if index < size and token not in added_text:
                plain.setdefault(token, None)
        for index, info in added_here.items():
            if index < size:
                added.setdefault(info.content, info)
    out = donor.copy()
    donor_vocab = donor.vocab()
    for token in plain:
        if token not in added and token not in donor_vocab:
            out.add(token)
    for info in added.values():
        out.add(info)
    return out


def build_vocabulary(spec: TokenizerSpec, model_dirs: list[Path], vocab_sizes: list[int | None], donor: int,
                     base: int | None, where: str) -> Vocabulary:
    """The output tokenizer and every model's row sources. `donor`: index of the model whose tokenizer `base`
    means; `base`: index of the merge's base model (its rows are preferred defaults), if any."""
    warnings: list[str] = []
    tokenizers = [FastTokenizer.load(d, where) for d in model_dirs]
    sizes = [size if size is not None else len(t.vocab()) for t, size in zip(tokenizers, vocab_sizes)]
    tokenizers[donor] = _stripped(tokenizers[donor], sizes[donor], where)
    if spec.source == "base":
        out = tokenizers[donor]
    elif spec.source == "union":
        order = [donor] + [i for i in range(len(tokenizers)) if i != donor]
        out = _union(tokenizers[donor], [tokenizers[i] for i in order], [sizes[i] for i in order])
    else:
        out = FastTokenizer.load(Path(spec.source), where)
    out = out.copy()
    existing = set(out.vocab())
    for token in spec.tokens:
        if token not in existing:
            out.add(token)
            existing.add(token)
    vocab = out.vocab()
    size = len(vocab)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size += spec.pad_to_multiple_of - size % spec.pad_to_multiple_of

    model_vocabs = [t.vocab() for t in tokenizers]
    perms = []  # output row -> model row or -1
    for model_vocab, model_size in zip(model_vocabs, sizes):
        perm = np.full(len(vocab), -1, dtype=np.int64)
        for token, index in vocab.items():
            own = model_vocab.get(token)
            if own is not None and own < model_size:
                perm[index] = own
        perms.append(perm)

    index_of = {str(Path(d).resolve()): i for i, d in enumerate(model_dirs)}

    def model_index(path: str, token: str) -> int:
        i = index_of.get(str(Path(path).resolve()))
        if i is None:
            raise ConfigError(f"{where}: tokenizer.tokens[{token!r}] takes its row from '{path}', which is not one "
                              "of the merged models.")
        return i

    present = np.stack([p >= 0 for p in perms])  # models x tokens
    defaults: dict[int, list[tuple[int, int]]] = {}
    forced = set()
    for token, index in vocab.items():
        cfg = spec.tokens.get(token)
        if cfg is not None and cfg.force:
            forced.add(index)
        if not (cfg is not None and cfg.force) and present[:, index].all():
            continue
        have = [m for m in range(len(perms)) if present[m, index]]
        source = cfg.source if cfg is not None else None
        if source is None:
            if len(have) == 1:
                source = TokenSource("model", str(model_dirs[have[0]]))
            elif not have:
                source = TokenSource("zero")
                warnings.append(f"token {token!r} is in no model's vocabulary; its row is zeros.")
            elif base is not None and present[base, index]:
                source = TokenSource("model", str(model_dirs[base]))
            else:
                defaults[index] = [(m, int(perms[m][index])) for m in have]
                continue
        if source.kind == "zero":
            defaults[index] = []
        elif source.kind == "model":
            m = model_index(source.model, token)
            if not present[m, index]:
                raise ConfigError(f"{where}: tokenizer.tokens[{token!r}] takes its row from '{source.model}', whose "
                                  "vocabulary does not have that token; use {kind: model_token, ...} to name one.")
            defaults[index] = [(m, int(perms[m][index]))]
        else:
            m = model_index(source.model, token)
            row = source.token_id
            if row is None:
                row = model_vocabs[m].get(source.token)
                if row is None:
                    raise ConfigError(f"{where}: tokenizer.tokens[{token!r}]: token {source.token!r} is not in the "
                                      f"vocabulary of '{source.model}'.")
            if not 0 <= row < sizes[m]:
                raise ConfigError(f"{where}: tokenizer.tokens[{token!r}]: token id {row} is outside the embedding "
                                  f"of '{source.model}' (0..{sizes[m] - 1}).")
            defaults[index] = [(m, int(row))]
    rows = []
    for perm in perms:
        own = perm.copy()
        if forced:
            own[list(forced)] = -1
        missing = {int(i): defaults.get(int(i), []) for i in np.nonzero(own < 0)[0]}
        rows.append(RowSources(own, missing, size, len(vocab)))
    return Vocabulary(out, size, rows, sizes, warnings)
