"""Kubernetes launch files shipped with tunerun: the RayJob/ConfigMap templates and the container recipe."""
