# SMTP framing (spec: fastrelay/_purepy/framing.py). Not written yet.

class ServerFramer:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("ServerFramer: not written yet")


class ReplyParser:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("ReplyParser: not written yet")


def encode_data(body):
    raise NotImplementedError("encode_data: not written yet")
