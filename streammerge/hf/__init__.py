"""Hugging Face models in and out: Hub ids, tokenizers, vocabulary views, and the files of a model directory."""
