# The route table (spec: fastrelay/_purepy/routetable.py). Not written yet.

class RouteTable:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("RouteTable: not written yet")
