"""XFER: transfer queued messages between relays over HTTP (seeds 000/001; docs/xfer.md).

`fastrelay.xfer.wire` is the sans-I/O wire format (version 1), `fastrelay.xfer.server` the aiohttp
server behind an HTTP_Listener; the client is `fastrelay.delivery.xfer`. Nothing is imported here,
so the wire format can be used without aiohttp.
"""
