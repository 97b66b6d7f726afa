"""Test helpers of the operator's tests: the emulated Kubernetes API and a running operator."""
