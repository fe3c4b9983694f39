"""Every built-in limit as a named constant; the conf file can override each one."""

# --- Reading conf files (fastrelay.config.parser). These bound the reading of the conf itself,
# so no conf option can change them: a hostile or broken file gets a file:line:col error, never a
# RecursionError, an unbounded read or a hang (issue 9). -----------------------------------------
# Stanzas, lists and hashes inside one another, counted across includes. Momentum's own confs
# nest 3 deep (Binding_Group > Binding > Domain; auth_ds > Scheme > Authenticate).
MAX_CONF_NESTING = 32
# Files included inside one another (a loop is reported as a loop before this).
MAX_CONF_INCLUDE_DEPTH = 32
# The largest conf file read, each file apart (a generated 1 MB conf takes 10 ms to tokenise).
MAX_CONF_FILE_SIZE = 16 * 1024 * 1024

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, CRLF included.
MAX_COMMAND_LINE = 512
# RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets, CRLF included.
MAX_TEXT_LINE = 1000
# A command line with no LF is discarded as it arrives; past this many octets the client is
# dropped (docs/reliability.md case 9: bounded memory for 10 MB with no LF).
COMMAND_HARD_CAP = 65536
# Postfix's message_size_limit default.
MAX_MESSAGE_SIZE = 10_240_000

# Replies read by our own clients (LMTP): RFC 5321 §4.5.3.1.5 says 512 octets; be lenient but
# bounded (docs/reliability.md case 44: hostile replies with bounded memory).
MAX_REPLY_LINE = 2048
MAX_REPLY_LINES = 100

# --- Receiving (docs/reliability.md part B). Each is overridable in the conf (docs/config.md). ---------
# Postfix's smtpd_recipient_limit; RFC 5321 §4.5.3.1.8 asks for at least 100.
MAX_RECIPIENTS = 1000
MAX_MESSAGES_PER_CONNECTION = 1000
# Connections per listener, and per client address (Postfix smtpd_client_connection_count_limit).
MAX_CONNECTIONS = 1000
MAX_CONNECTIONS_PER_IP = 50
# RFC 5321 §4.5.3.2.7: the server timeout should be at least 5 minutes (Idle_Time; Momentum's
# shipped ecelerity.conf sets 300 too). Below the floor check-config and run warn.
IDLE_TIMEOUT = 300.0
RFC5321_SERVER_TIMEOUT = 300.0
# Postfix's stress-mode smtpd_timeout.
OVERLOAD_IDLE_TIMEOUT = 10.0
# The share of Listener_Sessions above which the overload timeout applies.
OVERLOAD_FRACTION = 0.8
COMMAND_DEADLINE = 300.0
# The longest a message's content may take to arrive, from the 354 (or from each BDAT command) to
# its end, whatever min_data_rate says: with min_data_rate = 0, a client silent after 354 must not
# hold its slot for ever (issue 9). An hour is 10 MB at under 3 KB/s.
DATA_DEADLINE = 3600.0
# How long replies may sit unread in a connection's write buffer (the client does not read: writing
# is paused, or a close is waiting for the buffer to drain) before the connection is aborted. A
# close() waits for a drain that never comes (issue 9, docs/reliability.md case 14).
WRITE_TIMEOUT = 60.0
# After a reply that closes the connection while the client may still be sending (a deadline, an
# error limit, an HTTP verb: not QUIT, not a client's own EOF), how long the listener keeps reading
# and discarding its input after sending FIN. A close() with unread input makes the kernel answer
# with a reset, and a reset can destroy the 421 before the client reads it: the lingering close of
# Apache's lingering_close, bounded so a client that never stops cannot hold its slot.
CLOSE_LINGER = 2.0
# At shutdown, how long closing connections may take to flush their last reply before they are
# aborted.
SHUTDOWN_GRACE = 1.0
# Postfix smtpd_min_data_rate (bytes/s).
MIN_DATA_RATE = 500
# Postfix smtpd_junk_command_limit, smtpd_soft_error_limit, smtpd_hard_error_limit, smtpd_error_sleep_time.
JUNK_COMMAND_LIMIT = 100
SOFT_ERROR_LIMIT = 10
HARD_ERROR_LIMIT = 20
ERROR_SLEEP_TIME = 1.0
# Postfix hopcount_limit (docs/reliability.md case 16).
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

# --- Cluster (issue #14, docs/cluster.md) ----------------------------------------------------------
# Seconds a cluster connection lease lives in Redis without renewal (Cluster_Lease_Time): a dead
# node's slots come back within this long. Renewed every third of it.
CLUSTER_LEASE_TIME = 15.0
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
# --- Spool and queue (docs/reliability.md part (a)) -----------------------------------------------------
# How soon a message is tried again when the spool could not read or write it (at most; a shorter
# retry_interval of its domain wins): a failing disk must not strand it, nor spin on it.
# Conf: spool_failure_retry.
SPOOL_FAILURE_RETRY = 10.0
# Mainlog records kept in memory while the log cannot be written (full or read-only disk): past
# this many bytes the oldest are dropped, and the count is logged when writing works again.
# Conf: mainlog_max_pending.
MAINLOG_MAX_PENDING = 8 * 1024 * 1024
# Group commit window of the spool writer, in seconds (fastrelay.spool: Spool.commit_delay).
SPOOL_COMMIT_DELAY = 0.001
# Up to this many clients sending, the commit window ends once each one's message has joined the
# batch (fastrelay.spool: Spool._window). Conf: spool_commit_few_clients.
SPOOL_COMMIT_FEW_CLIENTS = 4
# The CPU scheduling policy of the spool writer's thread (fastrelay.cpu): "batch" (SCHED_BATCH,
# no wake-up preemption) or "inherit". Conf: cpu_scheduling.
CPU_SCHEDULING = "batch"
# Seconds between two hand-backs of freed heap memory to the kernel (fastrelay.memtrim).
MEMORY_TRIM_INTERVAL = 10.0
# teleport_enabled (seed 000: "don't swap out xfer message context if there is a temporary xfer
# failure"): bytes of bodies kept in memory for their quick retry, in all (teleport_memory_limit).
TELEPORT_MEMORY_LIMIT = 64 * 1024 * 1024
# --- admin API (issue 12) ---------------------------------------------------------------------
# Envelopes read at most per message-list call filtering on sender or recipient.
ADMIN_SCAN_MAX = 10000
# Messages per page of the message list, at most (and by default).
ADMIN_PAGE_MAX = 1000
ADMIN_PAGE_DEFAULT = 100
# Largest admin API request body (JSON); the injection endpoint uses max_message_size instead.
ADMIN_MAX_REQUEST = 1024 * 1024
# Audit lines kept in memory for GET /api/v1/audit (the log has them all).
ADMIN_AUDIT_KEEP = 1000

# --- Outbound chapter (issue #10: MultiVIP, traffic shaping) -------------------------------------
# Momentum's server_max_outbound_connections default: outbound connections open at once, all
# bindings together (in a Binding stanza: through that binding).
SERVER_MAX_OUTBOUND_CONNECTIONS = 75000
# The longest a throttled destination waits before it asks again; a throttle's own wait is
# usually far shorter ("N/S": S/N seconds between two events).
MAX_THROTTLE_WAIT = 3600.0
# Binding_Header values longer than this are ignored (a binding name is a short token).
MAX_BINDING_NAME = 255

# --- Seed 003 (Stalwart's transport limits) ---------------------------------------------------------
# queue.outbound.limits.mx / .multihomed: hosts and addresses of a next hop tried in one attempt.
# 0 = no limit, Momentum's behaviour (Stalwart's own example writes mx = 7, multihomed = 2).
# Conf: Max_MX_Hosts, Max_MX_Addresses.
MAX_MX_HOSTS = 0
MAX_MX_ADDRESSES = 0

# --- MTA-STS (RFC 8461) ------------------------------------------------------------------------------
# The HTTPS port policies are fetched from (§3.3: 443); conf MTA_STS_Port, for tests and proxies.
MTA_STS_PORT = 443
# The largest policy file read (§3.3 lets senders bound it; 64 KiB as the RFC's own suggestion).
MTA_STS_MAX_POLICY = 64 * 1024

# --- SMTP AUTH (issue 17, RFC 4954) -----------------------------------------------------------------
# scrypt cost for new password hashes (`fastrelay passwd add`): n=2^14, r=8, p=1 is the RFC 7914 §2
# interactive-login figure (~16 MiB, tens of milliseconds). A stored hash keeps its own parameters.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
# Stored hashes above this cost are refused (a hand-edited file must not exhaust memory per AUTH).
SCRYPT_MAX_N = 2**20
# The reply to a failed AUTH waits this long, doubled with each further failure of the same client
# address, up to AUTH_FAILURE_DELAY_CAP times as long (RFC 4954 leaves the delay to the server; as
# Postfix's smtpd_error_sleep_time, it slows guessing without holding a slot long).
AUTH_FAILURE_DELAY = 1.0
AUTH_FAILURE_DELAY_CAP = 16
# After this many failures from one address within AUTH_LOCKOUT_TIME, AUTH from it gets 454 4.7.0
# (no password is checked) until AUTH_LOCKOUT_TIME after its last failure.
AUTH_MAX_FAILURES = 5
AUTH_LOCKOUT_TIME = 900.0
# Client addresses whose failures are remembered per listener (the oldest are forgotten first).
AUTH_TRACKED_CLIENTS = 10_000
# With Workers > 1, how long worker 0's admin front waits for another worker's answer over its
# internal socket (a list or a summary scans at most ADMIN_SCAN_MAX messages there).
WORKER_ADMIN_TIMEOUT = 30.0
