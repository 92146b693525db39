//! Header mutation: a level's `*_headers_to_remove` and
//! `*_headers_to_add` (`core.v3.HeaderValueOption`), values compiled as
//! format strings.

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use ferry_model as m;

use super::coverage::fields;
use super::{ConvertError, Ctx};

fields!(pub(super) static HEADER_VALUE_OPTION = "envoy.config.core.v3.HeaderValueOption" {
    "header": applied,
    "append": applied "wins over append_action when set",
    "append_action": applied,
    "keep_empty_value": applied,
});

fields!(pub(super) static HEADER_VALUE = "envoy.config.core.v3.HeaderValue" {
    "key": applied,
    "value": applied "a format string (%REQ(…)%, %DOWNSTREAM_REMOTE_ADDRESS%, …)",
    "raw_value": applied "when value is empty",
});

/// A level's `*_headers_to_remove` then `*_headers_to_add`, values compiled
/// as format strings.
#[allow(deprecated)] // `append` is deprecated but still sent; Envoy honours it.
pub(super) fn header_mutations(
    ctx: &Ctx<'_>,
    add_field: &str,
    add: &[core_pb::HeaderValueOption],
    remove_field: &str,
    remove: &[String],
) -> Result<m::HeaderMutations, ConvertError> {
    use core_pb::header_value_option::HeaderAppendAction as A;
    let mut ops = Vec::with_capacity(add.len() + remove.len());
    for (i, h) in remove.iter().enumerate() {
        let name =
            http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                ctx.err(
                    format!("{remove_field}[{i}]"),
                    format!("{h:?} is not a valid header name"),
                )
            })?;
        if name == http::header::HOST {
            return Err(ctx.err(
                format!("{remove_field}[{i}]"),
                ":-prefixed or host headers may not be removed",
            ));
        }
        ops.push(m::HeaderOp::Remove(name));
    }
    for (i, hv) in add.iter().enumerate() {
        let hf = format!("{add_field}[{i}]");
        let core_pb::HeaderValueOption {
            header,
            append,
            append_action,
            keep_empty_value,
        } = hv;
        let h = header
            .as_ref()
            .ok_or_else(|| ctx.err(&hf, "header is required"))?;
        let core_pb::HeaderValue {
            key,
            value: text,
            raw_value,
        } = h;
        let name =
            http::HeaderName::from_bytes(key.to_ascii_lowercase().as_bytes()).map_err(|_| {
                ctx.err(
                    format!("{hf}.header.key"),
                    format!("{key:?} is not a valid header name"),
                )
            })?;
        if name == http::header::HOST {
            return Err(ctx.err(
                format!("{hf}.header.key"),
                ":-prefixed or host headers may not be modified",
            ));
        }
        let raw = if text.is_empty() && !raw_value.is_empty() {
            String::from_utf8(raw_value.clone()).map_err(|_| {
                ctx.err(format!("{hf}.header.raw_value"), "not a valid header value")
            })?
        } else {
            text.clone()
        };
        let value = m::format::HeaderFormat::parse(&raw)
            .map_err(|e| ctx.err(format!("{hf}.header.value"), e))?;
        if let Some(lit) = value.as_literal()
            && http::HeaderValue::from_str(&lit).is_err()
        {
            return Err(ctx.err(format!("{hf}.header.value"), "not a valid header value"));
        }
        let action = match append.as_ref() {
            // The deprecated `append` wins when it is set.
            Some(v) if v.value => m::AppendAction::AppendIfExistsOrAdd,
            Some(_) => m::AppendAction::OverwriteIfExistsOrAdd,
            None => match A::try_from(*append_action) {
                Ok(A::AppendIfExistsOrAdd) => m::AppendAction::AppendIfExistsOrAdd,
                Ok(A::AddIfAbsent) => m::AppendAction::AddIfAbsent,
                Ok(A::OverwriteIfExistsOrAdd) => m::AppendAction::OverwriteIfExistsOrAdd,
                Ok(A::OverwriteIfExists) => m::AppendAction::OverwriteIfExists,
                Err(_) => {
                    return Err(ctx.err(
                        format!("{hf}.append_action"),
                        format!("unknown append action {append_action}"),
                    ));
                }
            },
        };
        ops.push(m::HeaderOp::Add(m::HeaderToAdd {
            name,
            value,
            action,
            keep_empty: *keep_empty_value,
        }));
    }
    Ok(m::HeaderMutations { ops })
}
