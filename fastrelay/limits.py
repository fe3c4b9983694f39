"""Every built-in limit as a named constant; the conf file can override each one."""

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, CRLF included.
MAX_COMMAND_LINE = 512
# RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets, CRLF included.
MAX_TEXT_LINE = 1000
# A command line with no LF is discarded as it arrives; past this many octets the client is
# dropped (RELIABILITY.md case 9: bounded memory for 10 MB with no LF).
COMMAND_HARD_CAP = 65536
# Postfix's message_size_limit default.
MAX_MESSAGE_SIZE = 10_240_000

# Replies read by our own clients (LMTP): RFC 5321 §4.5.3.1.5 says 512 octets; be lenient but
# bounded (RELIABILITY.md case 44: hostile replies with bounded memory).
MAX_REPLY_LINE = 2048
MAX_REPLY_LINES = 100

# --- Receiving (RELIABILITY.md part B). Each is overridable in the conf (docs/config.md). ---------
# Postfix's smtpd_recipient_limit; RFC 5321 §4.5.3.1.8 asks for at least 100.
MAX_RECIPIENTS = 1000
MAX_MESSAGES_PER_CONNECTION = 1000
# Connections per listener, and per client address (Postfix smtpd_client_connection_count_limit).
MAX_CONNECTIONS = 1000
MAX_CONNECTIONS_PER_IP = 50
# RFC 5321 §4.5.3.2.7: the server timeout should be at least 5 minutes.
IDLE_TIMEOUT = 300.0
# Postfix's stress-mode smtpd_timeout.
OVERLOAD_IDLE_TIMEOUT = 10.0
# The share of Concurrency above which the overload timeout applies.
OVERLOAD_FRACTION = 0.8
COMMAND_DEADLINE = 300.0
# Postfix smtpd_min_data_rate (bytes/s).
MIN_DATA_RATE = 500
# Postfix smtpd_junk_command_limit, smtpd_soft_error_limit, smtpd_hard_error_limit, smtpd_error_sleep_time.
JUNK_COMMAND_LIMIT = 100
SOFT_ERROR_LIMIT = 10
HARD_ERROR_LIMIT = 20
ERROR_SLEEP_TIME = 1.0
# Postfix hopcount_limit (RELIABILITY.md case 16).
HOP_COUNT_LIMIT = 50
# KumoMTA refuses intake below 10% free; we use an absolute floor (spool_min_free).
SPOOL_MIN_FREE = 64 * 1024 * 1024
# How long a handshake may take after STARTTLS.
TLS_HANDSHAKE_TIMEOUT = 30.0
# How often the listener checks its connections' timers.
REAPER_INTERVAL = 1.0
# Client addresses whose relay/normalize decision is remembered (the cache is simply emptied
# when full).
CLIENT_POLICY_CACHE = 4096

# --- Workers (issue 13) -----------------------------------------------------------------------
# Most worker processes `Workers` accepts (production relays run on up to ~96 cores).
MAX_WORKERS = 256
# A worker that dies is restarted after this long, doubling while it keeps dying within
# WORKER_STABLE_AFTER seconds of its start, up to WORKER_RESTART_MAX.
WORKER_RESTART_DELAY = 0.5
WORKER_RESTART_MAX = 30.0
WORKER_STABLE_AFTER = 10.0
# How long SIGTERM waits for the workers to drain before they are killed (worker_stop_timeout).
WORKER_STOP_TIMEOUT = 60.0
# Slots of the relay-wide shared counter table (per-MX, per-site and per-client-IP connection
# counts across workers). A key is given a slot on first use and keeps it for the run; past
# SHARED_PROBE occupied slots a key shares its home slot with another key (stricter, never looser).
SHARED_SLOTS = 65536
SHARED_PROBE = 32
# With workers, a destination waiting for a slot held by another worker looks again this often
# (a release in another process wakes nobody in this one).
SHARED_POLL_INTERVAL = 0.05
# --- Outbound ---------------------------------------------------------------------------------------
# The least time one DNS question gets before it counts as a timeout (DNS_Timeout). c-ares
# shortens its own per-try timeout after fast answers (see fastrelay.dns), so this is enforced
# by the resolver on top of c-ares. 5 s is c-ares' and glibc's default per try.
DNS_TIMEOUT = 5.0
