"""The training side: the fine-tuning loop, the alignment tracker and the live watcher.

``alignscope.train.watch`` (the Trainer callback and plain-loop watcher) is imported on use: it
pulls in transformers.
"""

from alignscope.train.loop import finetune, response_nll

__all__ = ["finetune", "response_nll"]
