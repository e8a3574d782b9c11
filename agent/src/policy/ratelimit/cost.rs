//! What a request costs a rate limit: a fixed number of tokens per method and path
//! prefix (the first rule that matches), and optionally more read from a response
//! header once the response arrives (after-the-fact accounting).

use bulwark_proto::defaults::{DEFAULT_RATE_LIMIT_COST, MAX_RATE_LIMIT_COST};
use bulwark_proto::v1;
use http::{HeaderMap, HeaderName, Method};

/// A cost that cannot be enforced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCost {
    /// A cost above the maximum.
    #[error("cost {0} is more than {MAX_RATE_LIMIT_COST}")]
    TooHigh(u32),
    /// A rule's method is not an HTTP method.
    #[error("cost.rules[{index}].method {method:?} is not an HTTP method")]
    Method {
        /// The rule's position.
        index: usize,
        /// The bad value.
        method: String,
    },
    /// The response header is not a valid header name.
    #[error("cost.response_header {0:?} is not a valid HTTP header name")]
    Header(String),
}

/// A validated cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cost {
    /// Tokens of a request no rule matches.
    pub default: u32,
    /// The first rule that matches sets the cost.
    pub rules: Vec<CostRule>,
    /// A response header whose value is charged after the response.
    pub response_header: Option<HeaderName>,
}

/// A fixed cost by method and path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostRule {
    /// `None`: any method.
    pub method: Option<Method>,
    /// Empty: any path.
    pub path_prefix: String,
    /// Tokens.
    pub cost: u32,
}

impl Default for Cost {
    fn default() -> Self {
        Self {
            default: DEFAULT_RATE_LIMIT_COST,
            rules: Vec::new(),
            response_header: None,
        }
    }
}

fn checked(cost: u32) -> Result<u32, InvalidCost> {
    match cost {
        0 => Ok(DEFAULT_RATE_LIMIT_COST),
        n if n > MAX_RATE_LIMIT_COST => Err(InvalidCost::TooHigh(n)),
        n => Ok(n),
    }
}

impl TryFrom<Option<&v1::RateLimitCost>> for Cost {
    type Error = InvalidCost;

    fn try_from(proto: Option<&v1::RateLimitCost>) -> Result<Self, Self::Error> {
        let Some(proto) = proto else {
            return Ok(Cost::default());
        };
        let rules = proto
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let method =
                    match rule.method.as_str() {
                        "" => None,
                        m => Some(Method::from_bytes(m.as_bytes()).map_err(|_| {
                            InvalidCost::Method {
                                index,
                                method: m.to_owned(),
                            }
                        })?),
                    };
                Ok(CostRule {
                    method,
                    path_prefix: rule.path_prefix.clone(),
                    cost: checked(rule.cost)?,
                })
            })
            .collect::<Result<Vec<_>, InvalidCost>>()?;
        let response_header = match proto.response_header.as_str() {
            "" => None,
            name => Some(
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| InvalidCost::Header(name.to_owned()))?,
            ),
        };
        Ok(Cost {
            default: checked(proto.default_cost)?,
            rules,
            response_header,
        })
    }
}

impl Cost {
    /// Tokens `method` on `path` takes up front.
    pub fn of(&self, method: &Method, path: &str) -> u32 {
        self.rules
            .iter()
            .find(|rule| {
                rule.method.as_ref().is_none_or(|m| m == method)
                    && path.starts_with(rule.path_prefix.as_str())
            })
            .map_or(self.default, |rule| rule.cost)
    }

    /// Tokens a response's headers add after the fact (0 without the header, or with a
    /// value that is not a whole number), at most the largest cost.
    pub fn after(&self, headers: &HeaderMap) -> u32 {
        let Some(name) = &self.response_header else {
            return 0;
        };
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .map_or(0, |n| n.min(MAX_RATE_LIMIT_COST))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto() -> v1::RateLimitCost {
        v1::RateLimitCost {
            default_cost: 2,
            rules: vec![
                v1::CostRule {
                    method: "POST".into(),
                    path_prefix: "/search".into(),
                    cost: 10,
                },
                v1::CostRule {
                    method: String::new(),
                    path_prefix: "/bulk".into(),
                    cost: 50,
                },
            ],
            response_header: "x-cost".into(),
        }
    }

    #[test]
    fn the_first_matching_rule_sets_the_cost() {
        let cost = Cost::try_from(Some(&proto())).unwrap();
        assert_eq!(cost.of(&Method::POST, "/search/q"), 10);
        assert_eq!(cost.of(&Method::GET, "/search/q"), 2, "another method");
        assert_eq!(cost.of(&Method::GET, "/bulk"), 50, "any method");
        assert_eq!(cost.of(&Method::GET, "/"), 2);
        assert_eq!(Cost::try_from(None).unwrap().of(&Method::GET, "/"), 1);
    }

    #[test]
    fn a_response_header_adds_its_value_after_the_fact() {
        let cost = Cost::try_from(Some(&proto())).unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(cost.after(&headers), 0);
        headers.insert("x-cost", " 7 ".parse().unwrap());
        assert_eq!(cost.after(&headers), 7);
        headers.insert("x-cost", "lots".parse().unwrap());
        assert_eq!(cost.after(&headers), 0);
        headers.insert("x-cost", "4000000000".parse().unwrap());
        assert_eq!(cost.after(&headers), MAX_RATE_LIMIT_COST);
        assert_eq!(Cost::default().after(&headers), 0);
    }

    #[test]
    fn bad_costs_are_refused() {
        let mut bad = proto();
        bad.rules[0].cost = MAX_RATE_LIMIT_COST + 1;
        assert_eq!(
            Cost::try_from(Some(&bad)),
            Err(InvalidCost::TooHigh(MAX_RATE_LIMIT_COST + 1))
        );
        let mut bad = proto();
        bad.rules[1].method = "GE T".into();
        assert!(matches!(
            Cost::try_from(Some(&bad)),
            Err(InvalidCost::Method { index: 1, .. })
        ));
        let mut bad = proto();
        bad.response_header = "x cost".into();
        assert_eq!(
            Cost::try_from(Some(&bad)),
            Err(InvalidCost::Header("x cost".into()))
        );
    }
}
