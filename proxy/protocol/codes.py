"""Protocol constants: version and request codes, message type bytes, limits.

Message types are the integer value of the type byte, as indexing ``bytes`` yields.
See https://www.postgresql.org/docs/current/protocol-message-formats.html
"""

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# PostgreSQL's own cap (MAX_STARTUP_PACKET_LENGTH in libpq-be): a startup packet is
# tiny, and a bigger claim before authentication is an attack, not a client.
MAX_STARTUP_PACKET = 10000

# Frontend (client -> server) message types.
F_BIND = ord("B")
F_CLOSE = ord("C")
F_COPY_DATA = ord("d")
F_COPY_DONE = ord("c")
F_COPY_FAIL = ord("f")
F_DESCRIBE = ord("D")
F_EXECUTE = ord("E")
F_FLUSH = ord("H")
F_FUNCTION_CALL = ord("F")
F_PARSE = ord("P")
F_PASSWORD = ord("p")  # also SASLInitialResponse / SASLResponse / GSSResponse
F_QUERY = ord("Q")
F_SYNC = ord("S")
F_TERMINATE = ord("X")

# Backend (server -> client) message types.
B_AUTHENTICATION = ord("R")
B_BACKEND_KEY_DATA = ord("K")
B_BIND_COMPLETE = ord("2")
B_CLOSE_COMPLETE = ord("3")
B_COMMAND_COMPLETE = ord("C")
B_COPY_BOTH_RESPONSE = ord("W")
B_COPY_DATA = ord("d")
B_COPY_DONE = ord("c")
B_COPY_IN_RESPONSE = ord("G")
B_COPY_OUT_RESPONSE = ord("H")
B_DATA_ROW = ord("D")
B_EMPTY_QUERY = ord("I")
B_ERROR_RESPONSE = ord("E")
B_FUNCTION_CALL_RESPONSE = ord("V")
B_NEGOTIATE_PROTOCOL_VERSION = ord("v")
B_NO_DATA = ord("n")
B_NOTICE_RESPONSE = ord("N")
B_NOTIFICATION_RESPONSE = ord("A")
B_PARAMETER_DESCRIPTION = ord("t")
B_PARAMETER_STATUS = ord("S")
B_PARSE_COMPLETE = ord("1")
B_PORTAL_SUSPENDED = ord("s")
B_READY_FOR_QUERY = ord("Z")
B_ROW_DESCRIPTION = ord("T")

# Authentication request codes (the Int32 after 'R').
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_GSS = 7
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# Transaction status in ReadyForQuery.
TX_IDLE = ord("I")
TX_IN_BLOCK = ord("T")
TX_FAILED = ord("E")
