"""Kernel memory per held connection (instruments.measures.kernel_memory): read from the files
the kernel writes, here given as fixed text, so every figure is checked to the byte."""

from instruments.measures import kernel_memory, kernel_memory_per_connection

SOCKSTAT = """sockets: used {used}
TCP: inuse {inuse} orphan 1 tw 30 alloc {inuse} mem {pages}
UDP: inuse 0 mem 0
"""
SLABINFO = """slabinfo - version: 2.1
# name <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables ... : slabdata <active_slabs> ...
TCP                 {tcp}   {tcp}   2368   13    8 : tunables    0    0    0 : slabdata  {tcp_slabs}  {tcp_slabs}    0
sock_inode_cache    19     19    832   19    4 : tunables    0    0    0 : slabdata      1      1      0
kmalloc-64         640    640     64   64    1 : tunables    0    0    0 : slabdata     10     10      0
"""
MEMINFO = "MemTotal:       24684000 kB\nSlab:             {slab} kB\nSUnreclaim:       1000 kB\n"


def files(tmp_path, name, inuse, pages, tcp_slabs, slab_kib, slabinfo=True):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "sockstat").write_text(SOCKSTAT.format(used=inuse + 5, inuse=inuse, pages=pages))
    if slabinfo:
        (folder / "slabinfo").write_text(SLABINFO.format(tcp=tcp_slabs * 13, tcp_slabs=tcp_slabs))
    (folder / "meminfo").write_text(MEMINFO.format(slab=slab_kib))
    return dict(sockstat=str(folder / "sockstat"), slabinfo=str(folder / "slabinfo"),
                meminfo=str(folder / "meminfo"), page_size=4096)


def test_both_ends_of_each_held_connection_are_counted_from_slabinfo_and_sockstat(tmp_path):
    idle = kernel_memory(**files(tmp_path, "idle", inuse=10, pages=2, tcp_slabs=2, slab_kib=9000))
    holding = kernel_memory(**files(tmp_path, "holding", inuse=210, pages=12, tcp_slabs=18, slab_kib=9000))
    assert idle == {"tcp_mem_bytes": 8192, "tcp_inuse": 10, "tcp_orphan": 1, "tcp_tw": 30,
                    "slab_bytes": (2 * 8 + 4 + 10) * 4096, "socket_slab_bytes": (2 * 8 + 4) * 4096,
                    "slab_source": "slabinfo"}
    per = kernel_memory_per_connection(idle, holding, held=100)
    # 16 more TCP slabs of 8 pages for 100 connections (200 sockets: both ends on this machine)
    assert per["slab_bytes"] == per["socket_slab_bytes"] == 16 * 8 * 4096 / 100
    assert per["tcp_mem_bytes"] == 10 * 4096 / 100 and per["tcp_inuse"] == 2.0
    assert per["slab_source"] == "slabinfo"


def test_without_slabinfo_the_slab_figure_is_meminfos_and_says_so(tmp_path):
    idle = kernel_memory(**files(tmp_path, "idle", inuse=10, pages=2, tcp_slabs=2, slab_kib=9000, slabinfo=False))
    holding = kernel_memory(**files(tmp_path, "holding", inuse=210, pages=2, tcp_slabs=2, slab_kib=9400,
                                    slabinfo=False))
    per = kernel_memory_per_connection(idle, holding, held=100)
    assert per["slab_source"] == "meminfo" and per["slab_bytes"] == 400 * 1024 / 100
    assert per["socket_slab_bytes"] is None
    assert kernel_memory_per_connection(idle, holding, held=0) is None
