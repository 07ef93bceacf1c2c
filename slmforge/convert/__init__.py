"""Converters between a slmforge model directory and other formats: llama2c.py and hf.py import (llama2.c
checkpoints, Hugging Face Llama/Qwen2/SmolLM directories or cached hub ids), gguf.py exports for llama.cpp."""
