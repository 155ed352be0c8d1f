//! Notifications encoded once for all the streams they go to.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{DecodeContext, WireType};

use super::proto;
use crate::engine::bus::SentBatch;
use crate::engine::subscription::Outgoing;

/// A `restock.v1.Notification`, already encoded: what `Subscribe` streams send. The
/// notifications of a live batch are encoded once on each instance and every stream
/// copies the same bytes into its frames (at 1,000 streams, a thousand copies and one
/// encode). Clients decode into [`proto::Notification`]; this type is only ever
/// encoded, by the server.
#[derive(Clone, Debug, Default)]
pub struct EncodedNotification(Bytes);

impl EncodedNotification {
    pub fn of(outgoing: Outgoing) -> Self {
        Self(match outgoing {
            Outgoing::Live { batch, index } => {
                batch.encoded.get_or_init(|| encode_batch(&batch))[index].clone()
            }
            Outgoing::Recorded(n) => proto::Notification::from(&n).encode_to_vec().into(),
        })
    }
}

/// Every notification of `batch`, encoded into one buffer that they share.
///
/// The run's attributes are the same in every notification of the batch: their field
/// is encoded once and its bytes appended to each notification's other fields (a
/// protobuf message is the concatenation of its fields, in any order), instead of a
/// map built and encoded per notification.
fn encode_batch(batch: &SentBatch) -> Box<[Bytes]> {
    let attributes = proto::Notification {
        attributes: super::attributes_map(&batch.attributes),
        ..Default::default()
    }
    .encode_to_vec();
    let mut buf = BytesMut::new();
    (0..batch.items.len())
        .map(|index| {
            super::without_attributes(&batch.notification(index))
                .encode(&mut buf)
                .expect("a BytesMut grows as needed");
            buf.put_slice(&attributes);
            buf.split().freeze()
        })
        .collect()
}

impl Message for EncodedNotification {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    /// Never called: nothing decodes this type (the server only sends it). Skips the
    /// field, as for an unknown one.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{DateTime, Utc};

    use super::*;
    use crate::engine::bus::RunKey;

    #[test]
    fn live_and_recorded_notifications_encode_as_the_message() {
        let batch = Arc::new(SentBatch::of(
            RunKey::of(3, 2),
            Some(6),
            &[(11, 7), (5, 9)],
            DateTime::<Utc>::from_timestamp_micros(1_764_000_000_654_321).unwrap(),
        ));
        for index in 0..2 {
            let live = Outgoing::Live {
                batch: batch.clone(),
                index,
            };
            let expected = proto::Notification::from(&batch.notification(index));
            for outgoing in [live, Outgoing::Recorded(batch.notification(index))] {
                let bytes = EncodedNotification::of(outgoing).encode_to_vec();
                assert_eq!(proto::Notification::decode(&bytes[..]).unwrap(), expected);
            }
        }
    }

    #[test]
    fn streams_share_one_encoding_of_a_live_notification() {
        let batch = Arc::new(SentBatch::of(RunKey::of(1, 1), None, &[(4, 1)], Utc::now()));
        let live = || Outgoing::Live {
            batch: batch.clone(),
            index: 0,
        };
        let (a, b) = (
            EncodedNotification::of(live()),
            EncodedNotification::of(live()),
        );
        assert_eq!(
            a.0.as_ptr(),
            b.0.as_ptr(),
            "the same bytes, not two encodings"
        );
    }
}
