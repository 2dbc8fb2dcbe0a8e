"""The split channel: per-batch activations and gradients between clients and server."""

from fedsplit.channel.client import ChannelError, SplitChannelClient, StepReply
from fedsplit.channel.server import SplitChannelServer, Ticket, Traffic
from fedsplit.channel.wire import WireError

__all__ = ["ChannelError", "SplitChannelClient", "SplitChannelServer", "StepReply",
           "Ticket", "Traffic", "WireError"]
