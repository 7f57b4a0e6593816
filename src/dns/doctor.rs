//! `portcullis doctor DOMAIN`: a pre-flight of our own outbound mail's published records.
