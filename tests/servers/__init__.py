"""Real servers for tests: a ranged file server, a fault proxy and moto S3."""

from .faults import Faults, Rule
from .http_range import RangeHTTPServer, RequestRecord
from .proxy import FaultProxy
from .s3 import S3Server

__all__ = ["FaultProxy", "Faults", "RangeHTTPServer", "RequestRecord", "Rule", "S3Server"]
