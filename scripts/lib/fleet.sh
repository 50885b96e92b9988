# shellcheck shell=bash
# A fake fleet of nodes as network namespaces joined by a bridge that lives in its own namespace
# (the root namespace's networking and firewall are never touched).
#
#   fleet_up PREFIX name1 name2 ...   -> namespaces PREFIX-name1.., node i gets
#                                        198.18.0.<i>/24 and fd00:d06::<i>/64 on eth0
#   fleet_down PREFIX                 -> deletes every namespace starting with PREFIX-
#   fleet_addr4 i / fleet_addr6 i     -> the addresses of node i

fleet_addr4() { echo "198.18.0.$1"; }
fleet_addr6() { echo "fd00:d06::$1"; }

fleet_up() {
  local prefix=$1; shift
  local lan="$prefix-lan" i=0
  ip netns add "$lan"
  ip -n "$lan" link add br0 type bridge
  ip -n "$lan" link set br0 up
  ip -n "$lan" link set lo up
  for name in "$@"; do
    i=$((i + 1))
    local ns="$prefix-$name"
    ip netns add "$ns"
    # veth end names are limited to 15 characters
    local host_end="v${prefix:0:10}$i"
    ip link add "$host_end" type veth peer name eth0 netns "$ns"
    ip link set "$host_end" netns "$lan"
    ip -n "$lan" link set "$host_end" master br0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$(fleet_addr4 "$i")/24" dev eth0
    ip -n "$ns" addr add "$(fleet_addr6 "$i")/64" dev eth0 nodad
    ip -n "$ns" link set eth0 up
  done
}

fleet_down() {
  local prefix=$1 ns
  for ns in $(ip netns list | awk '{print $1}' | grep "^$prefix-" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}
