"""The serving engine's torch-free core: sequences, the paged KV block manager and the scheduler.

The model runner and engine (which need torch) live beside these modules but are not imported
here, so `import slimlm.serve.engine` stays cheap and unit tests need no model.
"""
from .block_manager import BlockManager
from .scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput
from .sequence import Sequence, SequenceStatus

__all__ = ["BlockManager", "ScheduledSeq", "Scheduler", "SchedulerConfig", "SchedulerOutput",
           "Sequence", "SequenceStatus"]
