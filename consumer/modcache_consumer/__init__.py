"""The execution consumer: runs workflow executions from RabbitMQ, importing workspace modules from the cache.

``cli`` (``modcache consumer``, ``workflows``, ``run``) -> ``consumer`` (``WorkflowExecutionConsumer``, one message
end to end) -> the pool, readiness, broker and health adapters -> lookups (workflows, configs, executions) ->
``database``; the worker side (what runs workflow code) loads no database client. docs/consumer.md has the rest.
"""
