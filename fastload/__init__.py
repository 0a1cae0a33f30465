"""fastload: fast, explainable LLM cold starts.

Streams safetensors checkpoints from local disk, HTTP(S) and S3 as parallel
byte-range reads straight into tensors, and explains where every second went.
"""

from .api import LoadStream, PullResult, aload, apull, from_pretrained, load, plan, pull, stream
from .config import LoadConfig, RetryConfig, S3Options
from .errors import (ConfigError, DeviceError, FastloadError, FormatError, IntegrityError, SourceChangedError,
                     SourceNotFoundError, SourcePermissionError, TransferError)
from .plan import LoadPlan, Shard
from .trace import Trace, TraceSummary

__version__ = "0.1.0"

__all__ = [
    "load", "aload", "stream", "plan", "from_pretrained", "pull", "apull", "PullResult",
    "LoadStream", "LoadPlan", "LoadConfig", "RetryConfig", "S3Options", "Shard",
    "Trace", "TraceSummary", "FastloadError", "ConfigError", "FormatError", "SourceNotFoundError",
    "SourcePermissionError", "TransferError", "SourceChangedError", "IntegrityError", "DeviceError",
]
