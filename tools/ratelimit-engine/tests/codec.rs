//! The filter encodes and decodes the Rate Limit Service messages by hand (src/rls.rs in the
//! root crate). These tests hold that code to the generated types of envoy-types: what the
//! filter writes decodes to the intended request, and what a generated server writes decodes
//! to the intended answer in the filter.

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration;
use prost::Message;
use rocketchat_ratelimit_wasm::rls;

#[test]
fn the_filters_request_is_the_generated_request() {
    for (unit, wire) in [
        (rls::Unit::Second, 1),
        (rls::Unit::Minute, 2),
        (rls::Unit::Hour, 3),
        (rls::Unit::Day, 4),
    ] {
        let entries = [
            ("client", "2001:db8::7"),
            ("route", "/api/v1/rooms/:/x%FF"),
            ("method", "POST"),
            ("window", "1700000000000"),
        ];
        let bytes = rls::encode_request(
            "rocketchat",
            &rls::Descriptor {
                entries: &entries,
                requests_per_unit: 300,
                unit,
            },
        );
        let decoded = RateLimitRequest::decode(bytes.as_slice()).unwrap();
        let expected = RateLimitRequest {
            domain: "rocketchat".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: entries
                    .iter()
                    .map(|(k, v)| Entry {
                        key: (*k).into(),
                        value: (*v).into(),
                    })
                    .collect(),
                limit: Some(RateLimitOverride {
                    requests_per_unit: 300,
                    unit: wire,
                }),
                hits_addend: None,
                is_negative_hits: false,
            }],
            hits_addend: 1,
        };
        assert_eq!(decoded, expected);
        // And byte for byte what prost writes for it.
        assert_eq!(bytes, expected.encode_to_vec());
    }
}

fn response(overall: Code, status: Code, requests: u32, remaining: u32) -> RateLimitResponse {
    RateLimitResponse {
        overall_code: overall as i32,
        statuses: vec![DescriptorStatus {
            code: status as i32,
            current_limit: Some(RateLimit {
                name: "rocketchat limit".into(),
                requests_per_unit: requests,
                unit: Unit::Minute as i32,
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(Duration {
                seconds: 42,
                nanos: 5,
            }),
            quota: None,
        }],
        response_headers_to_add: vec![],
        request_headers_to_add: vec![],
        raw_body: b"ignored".to_vec(),
        dynamic_metadata: None,
        quota: None,
    }
}

#[test]
fn the_generated_answer_is_what_the_filter_reads() {
    let ok = response(Code::Ok, Code::Ok, 10, 7).encode_to_vec();
    assert_eq!(
        rls::decode_answer(&ok),
        Some(rls::Answer {
            overall: rls::Code::Ok,
            statuses: vec![rls::Status {
                code: rls::Code::Ok,
                limit_remaining: 7,
                requests_per_unit: Some(10),
            }],
        })
    );
    let over = response(Code::OverLimit, Code::OverLimit, 10, 0).encode_to_vec();
    let answer = rls::decode_answer(&over).unwrap();
    assert_eq!(answer.overall, rls::Code::OverLimit);
    assert_eq!(answer.statuses[0].code, rls::Code::OverLimit);
    // A status without a current limit (an engine that does not serve the domain).
    let bare = RateLimitResponse {
        overall_code: Code::Ok as i32,
        statuses: vec![DescriptorStatus {
            code: Code::Ok as i32,
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    assert_eq!(
        rls::decode_answer(&bare).unwrap().statuses[0].requests_per_unit,
        None
    );
}
