//! Table-driven tests of the policy compiler.

use super::*;
