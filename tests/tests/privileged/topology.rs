//! Namespace topology test: placeholder replaced below.
