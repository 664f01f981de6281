"""The released item graph and the model learned on it, in reading order.

1. ``release``: what a site sums over its users in the two statistics rounds,
   each user bounded, and what the server releases from the (noisy) total, an
   :class:`~common.graph.release.ItemGraph`; the settings' rule of public
   quantities.
2. ``filters``: the maths those sums and releases use (bounded rows, Gram
   sums, the GF-CF filter, the rating neighbourhood).
3. ``features``: the released graph's score of a site's users, part by part,
   from each user's own row; their sum is the graph's own recommendation.
4. ``propagation``: the released graph as the GCN propagates over it, with the
   item text.

The learned model (``common.model``) scores ``theta . phi`` plus a correction
computed over ``propagation``; the sites' and the server's round logic stay in
``client.site_round`` and ``server.item_graph``.
"""
