"""The training side, run only as a subprocess (`python -m gitlora.trainer`): torch, transformers, peft."""
