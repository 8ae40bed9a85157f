"""`CLUSTER NODES` as the private Redis Cluster reads it: roles, who follows whom, failures, slots."""

from __future__ import annotations

from stack.servers import ClusterNodeView, parse_cluster_nodes

LISTING = (
    b"2e06 127.0.0.1:53099@63099 slave 199e 0 1795931680142 1 connected\n"
    b"77c3 127.0.0.1:45785@55785 master - 0 1795931679739 2 connected 5461-10922 [5461->-09ca]\n"
    b"09ca 127.0.0.1:34443@44443 master,fail - 1795931679000 1795931679739 3 disconnected 10923 10924-16383\n"
    b"199e 127.0.0.1:47483@57483 myself,master - 0 1795931680000 1 connected 0-5460\n"
    b"15d0 127.0.0.1:33917@43917 slave,fail? 77c3 0 1795931680142 2 connected\n"
)


def test_each_line_gives_the_role_the_master_followed_the_failure_and_the_slots() -> None:
    views = {view.port: view for view in parse_cluster_nodes(LISTING)}
    assert views[53099] == ClusterNodeView("2e06", 53099, False, False, False, "199e", ())
    # A slot being moved away ([slot->-node]) is still served by its owner, and listed once.
    assert views[45785] == ClusterNodeView("77c3", 45785, True, False, False, None, ((5461, 10922),))
    assert views[34443] == ClusterNodeView(
        "09ca", 34443, True, False, True, None, ((10923, 10923), (10924, 16383))
    )
    assert views[47483] == ClusterNodeView("199e", 47483, True, True, False, None, ((0, 5460),))
    assert views[33917] == ClusterNodeView("15d0", 33917, False, False, True, "77c3", ())
