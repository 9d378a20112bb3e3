"""The example application: a checkout saga across inventory, billing and shipping, and a notification.

Post an order to a running ``conveyor run``::

    curl -X POST localhost:8000/events/orders.placed \\
      -H 'content-type: application/cloudevents+json' \\
      -d '{"specversion":"1.0","id":"o-1","source":"shop","type":"orders.placed",
           "data":{"order_id":"o-1","customer":"ada@example.com","total_cents":4200}}'
"""
