//! `ferry-xds`: Envoy v3 configuration in, [`ferry_model::Snapshot`] out.
//!
//! - [`json`] turns Envoy's JSON/YAML form of any xDS message into the
//!   `envoy-types` protos (and back, for `/config_dump`) through the xDS
//!   descriptor set, so field names, enums, durations and `Any` types are
//!   checked exactly as Envoy checks them.
//! - [`bootstrap`] reads an Envoy bootstrap file.
//! - [`convert`] turns protos into the model, naming resource and field on error.

pub mod ads;
pub mod bootstrap;
pub mod ca;
pub mod convert;
pub mod dump;
pub mod file_secrets;
pub mod node;
pub mod runtime;
pub mod sds;
pub use ferry_envoy_json as json;
pub mod store;

pub use bootstrap::{Bootstrap, BootstrapError, config_dump, load_bootstrap};
pub use convert::{ConvertError, Warnings};
