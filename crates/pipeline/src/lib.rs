//! Stream stages for cloud-dump: compression, age encryption and SHA-256 as small sync
//! stages, and the bridges that connect them to sockets and object storage.

mod codec;
mod error;
pub mod keys;
pub mod repokey;
mod stages;
mod transfer;

pub use age::secrecy::{ExposeSecret, SecretString};
pub use codec::{
    generate_identity, parse_identities, parse_recipients, Compression, Decryption, EncodeSpec, Encryption, ObjectName,
};
pub use error::{PipelineError, Result};
pub use stages::{decoder, Digest, Digesting, Encoder, Hasher};
pub use transfer::{read_decoded, Finishing, Sink, Source, Stored};
