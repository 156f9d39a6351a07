"""A Grid that delivers each message to the real ClientApp of a node in this process (the
nodes' contexts kept between messages, as a SuperNode keeps them), for fast tests of the
server's round logic. Nodes can drop out from a given message type on."""

from flwr.app import Error, Message
from flwr.app.message.message import make_message
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from common import keys
from tests.helpers import context, metadata


class LocalGrid:
    def __init__(self, num_nodes, drop_at=None, **overrides):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp has them
        self.contexts = {1000 + p: context(partition_id=p, num_partitions=num_nodes, **overrides)
                         for p in range(num_nodes)}
        self.drop_at = dict(drop_at or {})  # partition -> message type from which it is gone
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self):
        return sorted(self.contexts)

    def _gone(self, node, message_type):
        stage = self.drop_at.get(node - 1000)
        if stage is None:
            return False
        order = ["query", *(f"train.{a}" for a in keys.SECAGG_STAGES)]
        return message_type in order and order.index(message_type) >= order.index(stage)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node, mtype = m.metadata.dst_node_id, m.metadata.message_type
            self.sent.append(m)
            if self._gone(node, mtype):
                continue
            msg = make_message(metadata(src=0, dst=node, message_type=mtype), content=m.content)
            meta = metadata(src=node, dst=0, reply_to=msg.metadata.message_id, message_type=mtype)
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as exc:  # as a SuperNode reports a ClientApp's exception
                got = make_message(meta, error=Error(code=0, reason=f"{type(exc).__name__}: {exc}"))
            else:
                got = (make_message(meta, error=reply.error) if reply.has_error()
                       else make_message(meta, content=reply.content))
            self.received.append(got)
            out.append(got)
        return out
