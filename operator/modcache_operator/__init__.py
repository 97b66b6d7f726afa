"""The modcache operator: one kopf daemon per ModuleCache keeps that cache converged and reports on it.

Layers, outermost first:

* ``cli``       -- ``modcache operator``: flags, servers, leader election, then kopf;
* ``handlers``  -- the kopf registry: the per-ModuleCache daemon and the event handlers that wake it;
* ``runner``    -- one ModuleCache's loop: resolve its Secrets, run the core ``Watcher``, keep status current;
* ``kube``, ``metrics``, ``health``, ``leader`` -- adapters (Kubernetes API, Prometheus, probes, Lease);
* ``spec``, ``status`` -- pure: the CR's spec as typed settings, and facts + previous status -> new status.
"""
