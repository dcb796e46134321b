"""Fine-tuning: a small generic loop (more: trackers, guards, HF callbacks)."""

from alignscope.train.loop import finetune, response_nll

__all__ = ["finetune", "response_nll"]
