"""The one exception the protocol layer raises: the peer broke the wire protocol."""


class ProtocolError(Exception):
    """Malformed or out-of-place protocol data. Sticky: the connection must close.

    Carries SQLSTATE 08P01 (protocol_violation) so the connection code can tell the
    peer what went wrong before closing.
    """

    sqlstate = "08P01"
