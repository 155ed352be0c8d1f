//! Listing runs: which runs, how many per page, and the page token that carries a page's
//! end to the next request.
//!
//! Pages are keyset pages, never offsets: runs come newest first, in descending order
//! of their key (the run row's id, handed out in creation order), and a page token is
//! the key of the last run a page held. A run started between two pages cannot shift
//! the next page, and reading page 1,000 costs what reading page 1 does.
//!
//! The token also holds the filter it was made for. A token sent back with a different
//! filter would start the new listing at a point of the old one, so it is refused
//! rather than honoured with a silently wrong page.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::{Error, Invalid, ProductId, Run, RunStatus};

/// Which runs a listing returns; `None` matches everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    pub product_id: Option<ProductId>,
}

/// Runs per page when the caller does not say (AIP-158).
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// The most runs per page; a larger page size is read as this one (AIP-158).
pub const MAX_PAGE_SIZE: u32 = 1_000;

/// Validates a caller's page size: 0 means the default, more than the maximum means the
/// maximum, a negative size is refused.
pub fn parse_page_size(raw: i32) -> Result<u32, Error> {
    match u32::try_from(raw) {
        Err(_) => Err(Error::InvalidArgument(Invalid::NegativePageSize(raw))),
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(size) => Ok(size.min(MAX_PAGE_SIZE)),
    }
}

/// One page of a listing, newest run first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPage {
    pub runs: Vec<Run>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageToken>,
}

/// Where the next page of a listing starts: after the run with key `after`, for
/// `filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken {
    filter: RunFilter,
    after: i64,
}

/// Version of the token's encoding, its first byte: a later encoding gets a new number,
/// so a token of an older build is recognised rather than misread.
const VERSION: u8 = 1;
const HAS_STATUS: u8 = 0b01;
const HAS_PRODUCT: u8 = 0b10;
/// version, flags, status, product id (8 bytes), key (8 bytes).
const TOKEN_LEN: usize = 19;

impl PageToken {
    pub fn new(filter: RunFilter, after: i64) -> Self {
        Self { filter, after }
    }

    /// The key of the last run of the previous page: the next page has the runs below it.
    pub fn after(&self) -> i64 {
        self.after
    }

    /// The opaque form a caller sends back: URL-safe base64 without padding (RFC 4648
    /// §5), so a token goes in a URL or a shell command as it is.
    pub fn encode(&self) -> String {
        let mut bytes = [0u8; TOKEN_LEN];
        bytes[0] = VERSION;
        if let Some(status) = self.filter.status {
            bytes[1] |= HAS_STATUS;
            bytes[2] = status_code(status);
        }
        if let Some(product) = self.filter.product_id {
            bytes[1] |= HAS_PRODUCT;
            bytes[3..11].copy_from_slice(&product.get().to_be_bytes());
        }
        bytes[11..19].copy_from_slice(&self.after.to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Reads a caller's `page_token` for a listing with `filter`: `None` when it is
    /// empty (the first page). Refused when it is not a token of this service, or was
    /// made for another filter.
    pub fn decode(token: &str, filter: &RunFilter) -> Result<Option<Self>, Error> {
        if token.is_empty() {
            return Ok(None);
        }
        let malformed = || Error::InvalidArgument(Invalid::NotAPageToken(Invalid::quote(token)));
        // The engine refuses padding and non-zero trailing bits: one token, one spelling.
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| malformed())?;
        let bytes: [u8; TOKEN_LEN] = bytes.try_into().map_err(|_| malformed())?;
        let flags = bytes[1];
        if bytes[0] != VERSION || flags & !(HAS_STATUS | HAS_PRODUCT) != 0 {
            return Err(malformed());
        }
        let status = match flags & HAS_STATUS {
            0 if bytes[2] == 0 => None,
            0 => return Err(malformed()),
            _ => Some(status_of_code(bytes[2]).ok_or_else(malformed)?),
        };
        let product = i64::from_be_bytes(bytes[3..11].try_into().expect("8 bytes"));
        let product_id = match flags & HAS_PRODUCT {
            0 if product == 0 => None,
            0 => return Err(malformed()),
            _ => Some(ProductId::parse(product).map_err(|_| malformed())?),
        };
        let after = i64::from_be_bytes(bytes[11..19].try_into().expect("8 bytes"));
        if after <= 0 {
            return Err(malformed());
        }
        let made_for = RunFilter { status, product_id };
        if made_for != *filter {
            return Err(Error::InvalidArgument(Invalid::PageTokenOfAnotherFilter));
        }
        Ok(Some(Self {
            filter: made_for,
            after,
        }))
    }
}

/// The byte a status is stored as in a token. Fixed forever: tokens outlive builds.
fn status_code(status: RunStatus) -> u8 {
    match status {
        RunStatus::InProgress => 1,
        RunStatus::CanceledBySoldOut => 2,
        RunStatus::CanceledByError => 3,
        RunStatus::Completed => 4,
    }
}

fn status_of_code(code: u8) -> Option<RunStatus> {
    Some(match code {
        1 => RunStatus::InProgress,
        2 => RunStatus::CanceledBySoldOut,
        3 => RunStatus::CanceledByError,
        4 => RunStatus::Completed,
        _ => return None,
    })
}

/// The order of the demand report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProductOrder {
    /// Most users waiting first; among equals, the highest id first.
    #[default]
    WaitingDesc,
    /// By id, ascending.
    Id,
}

/// Where a page of products ended: the last product's users waiting and id, for the
/// order it was made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProductPageToken {
    order: ProductOrder,
    waiting: i64,
    id: i64,
}

/// Bytes of a product page token: a version, the order, the waiting count, the id.
const PRODUCT_TOKEN_LEN: usize = 18;

impl ProductPageToken {
    pub fn new(order: ProductOrder, waiting: i64, id: i64) -> Self {
        Self { order, waiting, id }
    }

    /// The last product of the previous page: (users waiting, id).
    pub fn after(&self) -> (i64, i64) {
        (self.waiting, self.id)
    }

    pub fn encode(&self) -> String {
        let mut bytes = [0u8; PRODUCT_TOKEN_LEN];
        bytes[0] = VERSION;
        bytes[1] = match self.order {
            ProductOrder::WaitingDesc => 1,
            ProductOrder::Id => 2,
        };
        bytes[2..10].copy_from_slice(&self.waiting.to_be_bytes());
        bytes[10..18].copy_from_slice(&self.id.to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The token a client sent, for a listing in `order`; `None` for the first page.
    pub fn decode(token: &str, order: ProductOrder) -> Result<Option<Self>, Error> {
        if token.is_empty() {
            return Ok(None);
        }
        let malformed = || Error::InvalidArgument(Invalid::NotAPageToken(Invalid::quote(token)));
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| malformed())?;
        let bytes: [u8; PRODUCT_TOKEN_LEN] = bytes.try_into().map_err(|_| malformed())?;
        let made_for = match (bytes[0], bytes[1]) {
            (VERSION, 1) => ProductOrder::WaitingDesc,
            (VERSION, 2) => ProductOrder::Id,
            _ => return Err(malformed()),
        };
        let waiting = i64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes"));
        let id = i64::from_be_bytes(bytes[10..18].try_into().expect("8 bytes"));
        if waiting < 0 || id <= 0 {
            return Err(malformed());
        }
        if made_for != order {
            return Err(Error::InvalidArgument(Invalid::PageTokenOfAnotherOrder));
        }
        Ok(Some(Self { order, waiting, id }))
    }
}

/// A page of the demand report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductPage {
    pub products: Vec<super::Product>,
    pub next: Option<ProductPageToken>,
}

/// Which alerts `ListAlerts` lists: a product's (registration order), a user's (the
/// newest first), or the one of both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertFilter {
    pub product_id: Option<ProductId>,
    pub user_id: Option<super::UserId>,
    pub active_only: bool,
}

impl AlertFilter {
    /// A filter with a product, a user or both; neither is refused.
    pub fn new(
        product_id: Option<ProductId>,
        user_id: Option<super::UserId>,
        active_only: bool,
    ) -> Result<Self, Error> {
        if product_id.is_none() && user_id.is_none() {
            return Err(Error::InvalidArgument(Invalid::NoAlertFilter));
        }
        Ok(Self {
            product_id,
            user_id,
            active_only,
        })
    }
}

/// Where a page of alerts ended: the last alert's queue position (a product's alerts)
/// or row id (a user's), for the filter it was made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertPageToken {
    filter: AlertFilter,
    after: i64,
}

/// Bytes of an alert page token: a version, a kind, flags, product, user, position.
const ALERT_TOKEN_LEN: usize = 27;
/// The kind byte of an alert page token, so a token of another listing is refused.
const ALERT_TOKEN_KIND: u8 = 3;
const HAS_USER: u8 = 0b100;
const ACTIVE_ONLY: u8 = 0b1000;

impl AlertPageToken {
    pub fn new(filter: AlertFilter, after: i64) -> Self {
        Self { filter, after }
    }

    pub fn after(&self) -> i64 {
        self.after
    }

    pub fn encode(&self) -> String {
        let mut bytes = [0u8; ALERT_TOKEN_LEN];
        bytes[0] = VERSION;
        bytes[1] = ALERT_TOKEN_KIND;
        if let Some(product) = self.filter.product_id {
            bytes[2] |= HAS_PRODUCT;
            bytes[3..11].copy_from_slice(&product.get().to_be_bytes());
        }
        if let Some(user) = self.filter.user_id {
            bytes[2] |= HAS_USER;
            bytes[11..19].copy_from_slice(&user.get().to_be_bytes());
        }
        if self.filter.active_only {
            bytes[2] |= ACTIVE_ONLY;
        }
        bytes[19..27].copy_from_slice(&self.after.to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The token a client sent, for a listing with `filter`; `None` for the first page.
    pub fn decode(token: &str, filter: &AlertFilter) -> Result<Option<Self>, Error> {
        if token.is_empty() {
            return Ok(None);
        }
        let malformed = || Error::InvalidArgument(Invalid::NotAPageToken(Invalid::quote(token)));
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| malformed())?;
        let bytes: [u8; ALERT_TOKEN_LEN] = bytes.try_into().map_err(|_| malformed())?;
        let flags = bytes[2];
        if bytes[0] != VERSION
            || bytes[1] != ALERT_TOKEN_KIND
            || flags & !(HAS_PRODUCT | HAS_USER | ACTIVE_ONLY) != 0
        {
            return Err(malformed());
        }
        let id = |range: std::ops::Range<usize>| {
            i64::from_be_bytes(bytes[range].try_into().expect("8 bytes"))
        };
        let product_id = match flags & HAS_PRODUCT {
            0 => None,
            _ => Some(ProductId::parse(id(3..11)).map_err(|_| malformed())?),
        };
        let user_id = match flags & HAS_USER {
            0 => None,
            _ => Some(super::UserId::parse(id(11..19)).map_err(|_| malformed())?),
        };
        let after = id(19..27);
        let made_for = AlertFilter {
            product_id,
            user_id,
            active_only: flags & ACTIVE_ONLY != 0,
        };
        if after <= 0 || (product_id.is_none() && user_id.is_none()) {
            return Err(malformed());
        }
        if made_for != *filter {
            return Err(Error::InvalidArgument(Invalid::PageTokenOfAnotherFilter));
        }
        Ok(Some(Self {
            filter: made_for,
            after,
        }))
    }
}

/// A page of alerts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertPage {
    pub alerts: Vec<super::Alert>,
    pub next: Option<AlertPageToken>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(status: Option<RunStatus>, product: Option<i64>) -> RunFilter {
        RunFilter {
            status,
            product_id: product.map(|p| ProductId::parse(p).unwrap()),
        }
    }

    #[test]
    fn an_alert_token_round_trips_with_its_filter() {
        let product = Some(ProductId::parse(7).unwrap());
        let user = Some(crate::domain::UserId::parse(9).unwrap());
        for (p, u, active) in [
            (product, None, true),
            (None, user, false),
            (product, user, true),
        ] {
            let filter = AlertFilter::new(p, u, active).unwrap();
            let token = AlertPageToken::new(filter, 42);
            let decoded = AlertPageToken::decode(&token.encode(), &filter).unwrap();
            assert_eq!(decoded, Some(token));
            let other = AlertFilter::new(p, u, !active).unwrap();
            assert!(matches!(
                AlertPageToken::decode(&token.encode(), &other),
                Err(Error::InvalidArgument(Invalid::PageTokenOfAnotherFilter))
            ));
        }
        assert!(AlertFilter::new(None, None, false).is_err());
    }

    #[test]
    fn a_product_token_round_trips_and_keeps_its_order() {
        for order in [ProductOrder::WaitingDesc, ProductOrder::Id] {
            let token = ProductPageToken::new(order, 12, 34);
            let decoded = ProductPageToken::decode(&token.encode(), order).unwrap();
            assert_eq!(decoded, Some(token));
        }
        let waiting = ProductPageToken::new(ProductOrder::WaitingDesc, 1, 2).encode();
        assert!(matches!(
            ProductPageToken::decode(&waiting, ProductOrder::Id),
            Err(Error::InvalidArgument(Invalid::PageTokenOfAnotherOrder))
        ));
        let run = PageToken::new(RunFilter::default(), 5).encode();
        assert!(ProductPageToken::decode(&run, ProductOrder::Id).is_err());
        assert!(matches!(
            ProductPageToken::decode("", ProductOrder::Id),
            Ok(None)
        ));
    }

    #[test]
    fn tokens_are_canonical_url_safe_base64() {
        let token = PageToken::new(filter(None, Some(i64::MAX)), i64::MAX).encode();
        assert!(!token.contains(['+', '/', '=']), "{token}");
        assert_eq!(URL_SAFE_NO_PAD.encode([0xfb, 0xff]), "-_8");
        // Non-canonical trailing bits, padding, stray characters and impossible lengths.
        for bad in ["Zm9", "Zm8=", "Z", "Zm8/", "Zm8 ", "ä"] {
            assert!(URL_SAFE_NO_PAD.decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_token_round_trips_with_its_filter() {
        for f in [
            filter(None, None),
            filter(Some(RunStatus::Completed), None),
            filter(None, Some(i64::MAX)),
            filter(Some(RunStatus::InProgress), Some(7)),
        ] {
            let token = PageToken::new(f, 12_345);
            let decoded = PageToken::decode(&token.encode(), &f).unwrap().unwrap();
            assert_eq!(decoded, token);
            assert_eq!(decoded.after(), 12_345);
        }
        assert_eq!(PageToken::decode("", &filter(None, None)).unwrap(), None);
    }

    #[test]
    fn a_token_for_another_filter_is_refused() {
        let token = PageToken::new(filter(Some(RunStatus::Completed), Some(3)), 9).encode();
        for other in [
            filter(None, None),
            filter(Some(RunStatus::Completed), None),
            filter(Some(RunStatus::Completed), Some(4)),
            filter(Some(RunStatus::CanceledByError), Some(3)),
        ] {
            assert!(matches!(
                PageToken::decode(&token, &other),
                Err(Error::InvalidArgument(Invalid::PageTokenOfAnotherFilter))
            ));
        }
    }

    #[test]
    fn garbage_is_refused_and_quoted_short() {
        let any = filter(None, None);
        let good = PageToken::new(any, 5).encode();
        let mut versioned = URL_SAFE_NO_PAD.decode(&good).unwrap();
        versioned[0] = 2;
        let mut zero_key = URL_SAFE_NO_PAD.decode(&good).unwrap();
        zero_key[18] = 0;
        let huge = "x".repeat(10_000);
        for bad in [
            "not a token".to_string(),
            good[..good.len() - 1].to_string(),
            format!("{good}AA"),
            URL_SAFE_NO_PAD.encode(&versioned),
            URL_SAFE_NO_PAD.encode(&zero_key),
            huge.clone(),
        ] {
            match PageToken::decode(&bad, &any) {
                Err(Error::InvalidArgument(Invalid::NotAPageToken(quoted))) => {
                    assert!(quoted.len() <= Invalid::QUOTE_MAX + '…'.len_utf8());
                }
                other => panic!("{bad:.80}: {other:?}"),
            }
        }
    }

    #[test]
    fn page_size_defaults_caps_and_refuses_negatives() {
        assert_eq!(parse_page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(parse_page_size(3).unwrap(), 3);
        assert_eq!(parse_page_size(1_000).unwrap(), 1_000);
        assert_eq!(parse_page_size(i32::MAX).unwrap(), MAX_PAGE_SIZE);
        assert!(parse_page_size(-1).is_err());
    }
}
