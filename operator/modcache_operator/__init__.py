"""The modcache operator: one kopf daemon per ModuleCache keeps that cache converged and reports on it.

Layers, outermost first:

* ``cli``        -- ``modcache operator``: flags, servers, signals, leader election, then kopf;
* ``app``        -- kopf run with our signal handling, the probe and metrics servers;
* ``handlers``   -- the kopf registry: the per-ModuleCache daemon, an index of them, the event handler;
* ``supervisor`` -- one ModuleCache's level-triggered loop: Secrets, watcher lifecycle, backoff, prefix claims;
* ``reporter``   -- the watcher's observations and the supervisor's decisions as ``status.Facts``, and events;
* ``statuswriter`` -- the status computed against the server's copy and written on change, with backoff;
* ``leader``     -- the Lease elector (client-go semantics) with its watchdog;
* ``kube``, ``credentials``, ``metrics``, ``health``, ``claims``, ``fence`` -- adapters and shared state;
* ``spec``, ``status``, ``prefixes``, ``backoff``, ``clock``, ``tunables`` -- pure;
* ``names``      -- every Kubernetes name the operator uses.
"""
