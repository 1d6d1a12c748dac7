# shellcheck shell=bash
# The 1,000-rule policy the benchmarks load to measure the engine's cost: rules on ranges past the
# end of a 1 GiB export (and flushes counted to a billion), so the engine looks every request up
# and no rule ever matches.
write_thousand_rule_policy() {
    local file=$1 i start op
    local ops=(read write write_zeroes trim flush)
    {
        echo "rules:"
        for i in $(seq 0 999); do
            start=$(((2 << 30) + i * 65536))
            op=${ops[i % 5]}
            if [[ $op == flush ]]; then
                echo "  - {name: r$i, when: {op: flush, nth: $((1000000000 + i))}, then: {error: EIO}}"
            else
                echo "  - {name: r$i, when: {op: $op, range: $start..$((start + 65536))}, then: {error: EIO}}"
            fi
        done
    } >"$file"
}
