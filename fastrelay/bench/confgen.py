"""Generate a large, realistic ecelerity.conf-style configuration (deterministic per seed) for benchmarks."""

from __future__ import annotations

import random

_SYLLABLES = ["mail", "post", "net", "ex", "ample", "corp", "shop", "news", "go", "zen", "blue", "cloud",
              "data", "fast", "web", "co", "link", "mx", "smtp", "hub", "acme", "nova", "tera", "giga"]
_TLDS = ["com", "net", "org", "de", "co.uk", "fr", "io", "test", "example", "nl", "com.au"]
_DURATIONS = ["30s", "90s", "5m", "10m", "20m", "1h", "4h", "1d", "3d"]
_METHODS = ["ESMTP", "SMTP", "LMTP", '"delay_xfer"']
_LINE_COMMENTS = [
    "# tuned after the 2021 deliverability review",
    "# keep in sync with the DNS team's MX list",
    "# throttle: the receiver defers above this rate",
    "# see ticket OPS-4411",
    "# Zürich data centre — do not change without approval",
    "# TODO: revisit once the new IP pool is warmed up",
]
_BLOCK_COMMENTS = [
    "/* Binding-level overrides below apply only to the marketing IP pool. */",
    "/*\n * Domains in this section are routed through the regional smart hosts.\n"
    " * Changing Routes here bypasses DNS: check with networking first.\n */",
    "/* legacy: kept for the migration window */",
    "/*\n   retry_interval = 5m\n   max_retries = 3\n   (disabled: caused duplicate deferrals)\n*/",
]


def _domain(rng: random.Random) -> str:
    parts = [rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 1, 2)))]
    return ".".join(parts) + f"{rng.randrange(1000)}." + rng.choice(_TLDS)


def _ip(rng: random.Random) -> str:
    return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _routes(rng: random.Random) -> str:
    items = []
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.5:
            items.append(f'"smtp://{_ip(rng)}?pref={rng.choice((0, 10, 10, 20, 50))}"')
        elif roll < 0.7:
            items.append(f'"smtp://{_ip(rng)}?pref=10&ttl=300&type=mx"')
        elif roll < 0.85:
            items.append(f'"lmtp://[2001:db8::{rng.randrange(1, 0xFFFF):x}]:24"')
        else:
            items.append('"__mx__"')
    if rng.random() < 0.3:
        return "Routes = (\n    " + "\n    ".join(items) + "\n  )"
    return "Routes = ( " + " ".join(items) + " )"


def _domain_options(rng: random.Random, indent: str) -> list[str]:
    options = [
        _routes(rng),
        f"max_outbound_connections = {rng.choice((2, 5, 10, 20, 50, 100))}",
        f"Delivery_Method = {rng.choice(_METHODS)}",
        f"retry_interval = {rng.choice(_DURATIONS)}",
        f"max_retry_interval = {rng.choice(_DURATIONS)}",
        f"message_expiration = {rng.choice((86400, 172800, 259200, 432000))}",
        f"outbound_throttle_messages = \"{rng.randint(10, 900)}/60\"",
        f"Remote_SMTP_Port = {rng.choice((25, 25, 587, 2525))}",
        f"Gateway = {_ip(rng)}",
        f"reroute_domain = \"{rng.choice(('disabled', 'xfer.test', 'fallback.example'))}\"",
        f"Delivery_Response_Timeout = \"{rng.choice((10000, 30000, 60000))}\"",
        f"tls = {rng.choice(('ifavailable', 'required', 'off'))}",
        "Bounce_Template = \"Delivery to %s failed:\\n\\t\\\"%s\\\"\\n\"",
        f'Spool_Path = "/var/spool/ecelerity/{rng.choice(_SYLLABLES)}"',
        'X_Header = "Réseau d\'envoi — 配信"',
        "Prohibited_Hosts = ( \"127.0.0.1\" \"[::1]\" \"10.10.10.50\" )",
        "host_failure_retry = 1",
        "teleport_enabled = 1",
    ]
    lines = []
    for option in rng.sample(options, rng.randint(3, 8)):
        if rng.random() < 0.12:
            lines.append(indent + rng.choice(_LINE_COMMENTS))
        suffix = ""
        if rng.random() < 0.1:
            suffix = f"  # {rng.choice(('10s', 'per RFC 5321', 'default', 'ops request'))}"
        lines.append(indent + option.replace("\n", "\n" + indent) + suffix)
    return lines


def _domain_stanza(rng: random.Random, indent: str = "") -> str:
    inner = _domain_options(rng, indent + "  ")
    return f"{indent}Domain {_domain(rng)} {{\n" + "\n".join(inner) + f"\n{indent}}}\n"


def _binding_stanza(rng: random.Random, number: int) -> str:
    lines = [
        f'Binding "pool{number}" {{',
        f'  Bind_Address = "{_ip(rng)}"',
        f'  EHLO_Hostname = "mta{number}.{rng.choice(_SYLLABLES)}.example"',
        f"  max_outbound_connections = {rng.choice((50, 100, 200))}",
    ]
    body = "\n".join(lines) + "\n"
    for _ in range(rng.randint(1, 3)):
        body += _domain_stanza(rng, "  ")
    return body + "}\n"


def _host_stanza(rng: random.Random) -> str:
    host = _ip(rng) if rng.random() < 0.8 else f"[2001:db8::{rng.randrange(1, 0xFFFF):x}]"
    return f"Host {host} {{ max_outbound_connections = {rng.choice((1, 2, 5, 10))} }}\n"


_HEADER = """\
# ecelerity.conf -- generated for the tokeniser benchmark
# Global options
Spool_Base = "/var/spool/ecelerity"
Server_Max_File_Descriptors = 16384
Keep_Message_Dicts_In_Memory = true
Max_Resident_Active_Queue = 250000
Gateway = 10.10.10.50
Remote_SMTP_Port = 25
delayed_reroute_domain = "xfer.test"
Routes = ( "smtp://my.local.smart.host?pref=1" "__mx__" )

Control_Listener {
  Listen "/tmp/2025" { Protocol = "ecstream" }
}

ESMTP_Listener {
  Listen ":25" {
    Pathway = "inbound"  # all incoming mail
  }
  SMTP_Extensions = ( "ENHANCEDSTATUSCODES" "8BITMIME" "PIPELINING" "STARTTLS" )
}

HTTP_Listener {
  Listen ":8080" {}
}

scriptlet "scriptlet" {
  # load the XFER server module
  script xfer_server {
    source = "msys.xfer.server"
  }
}

Domain xfer.test {
  reroute_domain = "disabled"
  Delivery_Method = "delay_xfer"
  Delivery_Response_Timeout = "10000"  # 10s
  Routes = (
    "xfer://10.10.10.10?port=8080"
  )
  HTTP_URI = "/delay_message"
}

"""


def generate_conf(target_bytes: int = 1_000_000, seed: int = 1) -> bytes:
    """A conf of about target_bytes (just over it, by at most one stanza), the same for the same seed."""
    rng = random.Random(seed)
    chunks = [_HEADER.encode()]
    size = len(chunks[0])
    binding = 0
    while size < target_bytes:
        roll = rng.random()
        if roll < 0.65:
            text = _domain_stanza(rng)
        elif roll < 0.75:
            binding += 1
            text = _binding_stanza(rng, binding)
        elif roll < 0.95:
            text = _host_stanza(rng)
        else:
            text = rng.choice(_BLOCK_COMMENTS) + "\n"
        chunk = (text + "\n").encode()
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


if __name__ == "__main__":
    import sys

    sys.stdout.buffer.write(generate_conf(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
