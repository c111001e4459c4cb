"""The `sdpo` command: key management today; `up` and `demo` are added by the lead."""
