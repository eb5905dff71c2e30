//! Software offloads at the edge: complete partial checksums and segment GSO frames for
//! destinations that cannot take them (see [`crate::OffloadCaps`]).
