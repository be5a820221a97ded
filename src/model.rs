//! Plain value types shared by every module: identifiers checked once at the edge, and the
//! account assignment itself. Everything here is ordered so plans come out deterministic.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A 12-digit AWS account id. Kept as a string: leading zeros are significant.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccountId(String);

impl AccountId {
    /// The id as AWS writes it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AccountId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(AccountId(s))
        } else {
            Err(format!("expected a 12-digit AWS account id, got {s:?}"))
        }
    }
}

impl From<AccountId> for String {
    fn from(a: AccountId) -> String {
        a.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Microsoft Entra object id (a GUID), lower-cased so comparisons are exact.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Guid(String);

impl Guid {
    /// The canonical lower-case form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `s` has the 8-4-4-4-12 hexadecimal shape of a GUID.
    pub fn looks_like(s: &str) -> bool {
        let groups: Vec<&str> = s.split('-').collect();
        groups.len() == 5
            && groups
                .iter()
                .zip([8, 4, 4, 4, 12])
                .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
    }
}

impl TryFrom<String> for Guid {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if Guid::looks_like(&s) {
            Ok(Guid(s.to_ascii_lowercase()))
        } else {
            Err(format!(
                "expected a GUID such as 11111111-2222-3333-4444-555555555555, got {s:?}"
            ))
        }
    }
}

impl From<Guid> for String {
    fn from(g: Guid) -> String {
        g.0
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of Identity Center principal an assignment names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PrincipalType {
    /// An identity-store group.
    Group,
    /// An identity-store user.
    User,
}

impl PrincipalType {
    /// The name Identity Center's API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalType::Group => "GROUP",
            PrincipalType::User => "USER",
        }
    }

    /// Parses Identity Center's spelling.
    pub fn parse(s: &str) -> Option<PrincipalType> {
        match s {
            "GROUP" => Some(PrincipalType::Group),
            "USER" => Some(PrincipalType::User),
            _ => None,
        }
    }
}

impl fmt::Display for PrincipalType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An identity-store principal: a user or group id of the identity store.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Principal {
    /// User or group.
    pub principal_type: PrincipalType,
    /// The identity-store id.
    pub principal_id: String,
}

/// One Identity Center account assignment: a principal holds a permission set in an account.
/// Field order is the sort order: by account, then permission set, then principal.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Assignment {
    /// The target account.
    pub account_id: AccountId,
    /// The permission set's ARN.
    pub permission_set_arn: String,
    /// USER or GROUP.
    pub principal_type: PrincipalType,
    /// The identity-store id of the principal.
    pub principal_id: String,
}

impl Assignment {
    /// The principal half of the assignment.
    pub fn principal(&self) -> Principal {
        Principal {
            principal_type: self.principal_type,
            principal_id: self.principal_id.clone(),
        }
    }

    /// A stable text key, used as the state table's sort key.
    pub fn key(&self) -> String {
        format!(
            "{}#{}#{}#{}",
            self.account_id, self.permission_set_arn, self.principal_type, self.principal_id
        )
    }

    /// The assignment a [`Assignment::key`] stands for, or what is wrong with the text.
    pub fn from_key(key: &str) -> Result<Assignment, String> {
        let mut parts = key.splitn(4, '#');
        let (Some(account), Some(ps), Some(kind), Some(id)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "{key:?} is not account#permission set#type#principal"
            ));
        };
        let principal_type = PrincipalType::parse(kind)
            .ok_or_else(|| format!("{key:?}: {kind:?} is not USER or GROUP"))?;
        if ps.is_empty() || id.is_empty() {
            return Err(format!("{key:?}: empty permission set or principal"));
        }
        Ok(Assignment {
            account_id: AccountId::try_from(account.to_string())?,
            permission_set_arn: ps.to_string(),
            principal_type,
            principal_id: id.to_string(),
        })
    }
}

impl fmt::Display for Assignment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.account_id, self.permission_set_arn, self.principal_type, self.principal_id
        )
    }
}

/// A secret value (client secret, access token) that never prints: `Debug` and `Display`
/// show a fixed placeholder so a stray `{:?}` cannot leak it into a log or an error.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_keep_leading_zeros_and_reject_other_shapes() {
        let a = AccountId::try_from("000000000042".to_string()).unwrap();
        assert_eq!(a.as_str(), "000000000042");
        for bad in ["12345678901", "1234567890123", "12345678901a", ""] {
            assert!(AccountId::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn guids_are_checked_and_lowercased() {
        let g = Guid::try_from("AAAAAAAA-bbbb-CCCC-dddd-000000000001".to_string()).unwrap();
        assert_eq!(g.as_str(), "aaaaaaaa-bbbb-cccc-dddd-000000000001");
        for bad in [
            "aaaaaaaa-bbbb-cccc-dddd-00000000000",
            "aaaaaaaa-bbbb-cccc-dddd-00000000000g",
            "AWS Platform Admins",
        ] {
            assert!(Guid::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn assignment_keys_read_back() {
        let a = Assignment {
            account_id: AccountId::try_from("000000000042".to_string()).unwrap(),
            permission_set_arn: "arn:aws:sso:::permissionSet/ssoins-1/ps-1".into(),
            principal_type: PrincipalType::Group,
            principal_id: "9067c6f2b2-g1".into(),
        };
        assert_eq!(Assignment::from_key(&a.key()), Ok(a));
        for bad in [
            "",
            "000000000042#arn",
            "000000000042#arn#ROLE#x",
            "42#arn#USER#x",
        ] {
            assert!(Assignment::from_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** Secret(***)");
        assert_eq!(s.expose(), "hunter2");
    }
}
