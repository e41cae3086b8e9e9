//! Every way a peer can break the WebSocket protocol, and the close code each one earns.

use std::fmt;

/// Close codes this server sends (RFC 6455 §7.4.1, plus the 4000 range for the application).
pub mod code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// A protocol violation by the peer. The connection is failed with [`WsError::close_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsError {
    /// RSV1-3 set while no extension was negotiated.
    ReservedBits,
    /// Opcode 0x3-0x7 or 0xB-0xF.
    ReservedOpcode,
    /// A client frame without the mask bit (§5.1).
    UnmaskedFrame,
    /// A control frame with FIN clear.
    FragmentedControl,
    /// A control frame with more than 125 payload bytes.
    ControlTooLong,
    /// An extended payload length that a shorter form could have carried.
    NonMinimalLength,
    /// A 64-bit payload length with its most significant bit set.
    LengthHighBit,
    /// A continuation frame with no message in progress.
    UnexpectedContinuation,
    /// A new data frame while a fragmented message is still in progress.
    ExpectedContinuation,
    /// A Close frame with a 1-byte payload.
    CloseTooShort,
    /// A Close frame carrying a code that must not appear on the wire.
    InvalidCloseCode,
    /// A Close frame whose reason is not UTF-8.
    InvalidCloseReason,
    /// A text message that is not UTF-8 (detected as early as the bytes allow).
    InvalidUtf8,
    /// A message larger than the configured limit, counted across fragments.
    MessageTooBig,
    /// More frames without data (pings, pongs, empty fragments) than the per-second allowance.
    EmptyFrameFlood,
}

impl WsError {
    /// The close code this violation is answered with; the single mapping point.
    pub fn close_code(self) -> u16 {
        match self {
            WsError::InvalidUtf8 => code::INVALID_PAYLOAD,
            WsError::MessageTooBig => code::MESSAGE_TOO_BIG,
            WsError::EmptyFrameFlood => code::POLICY_VIOLATION,
            _ => code::PROTOCOL_ERROR,
        }
    }

    /// A short reason for the Close frame and the log.
    pub fn reason(self) -> &'static str {
        match self {
            WsError::ReservedBits => "reserved bits set",
            WsError::ReservedOpcode => "reserved opcode",
            WsError::UnmaskedFrame => "client frame not masked",
            WsError::FragmentedControl => "fragmented control frame",
            WsError::ControlTooLong => "control frame too long",
            WsError::NonMinimalLength => "non-minimal payload length",
            WsError::LengthHighBit => "payload length high bit set",
            WsError::UnexpectedContinuation => "continuation without a message",
            WsError::ExpectedContinuation => "expected continuation frame",
            WsError::CloseTooShort => "close payload of 1 byte",
            WsError::InvalidCloseCode => "invalid close code",
            WsError::InvalidCloseReason => "close reason not UTF-8",
            WsError::InvalidUtf8 => "text not UTF-8",
            WsError::MessageTooBig => "message too big",
            WsError::EmptyFrameFlood => "too many empty frames",
        }
    }
}

impl fmt::Display for WsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason(), self.close_code())
    }
}

impl std::error::Error for WsError {}

/// Whether `code` may appear in a Close frame received from a peer (§7.4).
///
/// 1004-1006 and 1015 are reserved and never sent; 1016-2999 are unassigned; 3000-4999 belong
/// to libraries and applications.
pub fn is_valid_received_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_code_mapping() {
        // The log line names the violation and its code.
        assert_eq!(
            WsError::EmptyFrameFlood.to_string(),
            "too many empty frames (1008)"
        );
        assert_eq!(WsError::InvalidUtf8.close_code(), 1007);
        assert_eq!(WsError::MessageTooBig.close_code(), 1009);
        assert_eq!(WsError::EmptyFrameFlood.close_code(), 1008);
        assert_eq!(WsError::InvalidCloseReason.close_code(), 1002);
        assert_eq!(WsError::CloseTooShort.close_code(), 1002);
        assert_eq!(WsError::UnmaskedFrame.close_code(), 1002);
    }

    #[test]
    fn received_close_codes() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            assert!(is_valid_received_close_code(ok), "{ok}");
        }
        for bad in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!is_valid_received_close_code(bad), "{bad}");
        }
    }
}
