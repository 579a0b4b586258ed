"""The instruments every harness command and test measures with, one definition each:
what a figure means (measures), when an answer arrived (stamps), how far apart two
clocks are (clocks), how an HTTP answer is framed (httpframe), the report page that
names the machine a figure came from (page), and what the measured server ran: its
revision and CHATTLE_BENCH_* settings (provenance). The server never imports them.
"""
