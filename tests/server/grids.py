"""A Grid for strategy tests: sites answer in-process, replies are pulled as the server streams.

Subclasses define ``answer(message) -> Message | None``; ``None`` is a site that never answers
(the server's stream waits for it until the round's timeout). A ClientApp exception becomes an
error reply, as Flower makes one.
"""

from __future__ import annotations

from flwr.app import Error, Message


class PushPullGrid:
    """``push_messages`` / ``pull_messages`` (what server.streaming uses) and
    ``send_and_receive`` on top of the subclass's ``answer``."""

    def __init__(self, node_ids) -> None:
        self.node_ids = list(node_ids)
        self.sent: list[Message] = []
        self.pending: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.node_ids)

    def answer(self, message: Message) -> Message | None:
        raise NotImplementedError

    def _reply(self, message: Message) -> Message | None:
        try:
            reply = self.answer(message)
        except Exception as err:  # Flower turns a ClientApp exception into an error reply
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
        if reply is not None:
            reply.metadata.__dict__["_reply_to_message_id"] = message.metadata.message_id
        return reply

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            self.sent.append(msg)
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for mid in list(message_ids):
            if mid in self.pending:
                reply = self._reply(self.pending[mid])
                if reply is not None:
                    del self.pending[mid]
                    replies.append(reply)
        return replies

    def send_and_receive(self, messages, timeout=None):
        return self.pull_messages(self.push_messages(messages))
