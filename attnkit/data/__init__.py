"""Generated seq2seq tasks and their vocabulary."""

from .tasks import TASKS, Seq2SeqTask, get_task, number_words, ordinal
from .vocab import Vocab, batches, make_batch, pad_batch

__all__ = ["TASKS", "Seq2SeqTask", "get_task", "number_words", "ordinal", "Vocab", "batches", "make_batch", "pad_batch"]
