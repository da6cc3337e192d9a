package batch

import (
	"fmt"
	"slices"
	"strings"
)

// resolveDeps checks that ids are unique and turns depends_on ids into
// operation indexes.
func (p *parser) resolveDeps(b *batch) {
	if !p.linked {
		return // default ids are unique, and nothing refers to any
	}
	byID := make(map[string]int, len(b.ops))
	for _, op := range b.ops {
		if first, dup := byID[op.id]; dup {
			p.opFault(op, "id %q is already used by operation %d", short(op.id), first)
			continue
		}
		byID[op.id] = op.index
	}
	// added[j] is i+1 once operation i depends on j: each dependency is
	// added once, in time linear in the lists however long they are.
	added := make([]int, len(b.ops))
	add := func(op *operation, j int) {
		if added[j] != op.index+1 {
			added[j] = op.index + 1
			op.deps = append(op.deps, j)
		}
	}
	groups := p.resolveGroups(b, byID, add)
	// Depending on (or reading) an operation of another atomicity group
	// waits for the whole group: it may yet fail and be rolled back. The
	// group runs as a chain, so its last operation ends it; its first is
	// where runner.decide sees that the group failed. Two edges, not one
	// per member: 14,000 operations on a group of 14,000 were 196 million.
	addDep := func(op *operation, j int) {
		if g := b.ops[j].group; g != 0 && g != op.group {
			members := b.groups[g-1].ops
			add(op, members[0])
			add(op, members[len(members)-1])
			return
		}
		add(op, j)
	}
	for _, op := range b.ops {
		for _, id := range op.depIDs {
			j, ok := byID[id]
			if g, isGroup := groups[id]; !ok && isGroup {
				if g+1 == op.group {
					p.opFault(op, "operation cannot depend on its own atomicity group")
					continue
				}
				j, ok = b.groups[g].ops[0], true
			}
			switch {
			case !ok:
				p.opFault(op, "depends_on names unknown operation %q", short(id))
			case j == op.index:
				p.opFault(op, "operation cannot depend on itself")
			default:
				addDep(op, j)
			}
		}
		op.depIDs = nil
		// So does a condition: what it tests must be final.
		if c := op.cond; c != nil {
			for k, id := range c.ids {
				j, ok := byID[id]
				switch {
				case !ok:
					p.opFault(op, "if names unknown operation %q", short(id))
				case j == op.index:
					p.opFault(op, "if: an operation cannot test its own answer")
				default:
					c.ops[k] = j
					b.ops[j].tested = true
					addDep(op, j)
				}
			}
		}
		// A reference implies a dependency.
		if op.refs != nil {
			for _, r := range op.refs.all() {
				j, ok := byID[r.id]
				switch {
				case !ok:
					p.opFault(op, "reference %s names unknown operation %q", short(r.raw), r.id)
				case j == op.index:
					p.opFault(op, "reference %s: an operation cannot refer to its own answer", short(r.raw))
				default:
					r.op = j
					b.ops[j].keep(r)
					addDep(op, j)
				}
			}
		}
		// A rollback runs after the batch, so it may read any answer,
		// its own operation's too.
		if rb := op.rollback; rb != nil && rb.refs != nil {
			for _, r := range rb.refs.all() {
				j, ok := byID[r.id]
				if !ok {
					p.opFault(rb, "reference %s names unknown operation %q", short(r.raw), r.id)
					continue
				}
				r.op = j
				b.ops[j].keep(r)
			}
		}
	}
	if b.mode == modeSequential {
		for _, op := range b.ops {
			for _, d := range op.deps {
				if g := b.ops[d].group; g != 0 && g != op.group && d != b.groups[g-1].ops[0] {
					continue // another group, named once by its first
				}
				if d > op.index {
					p.opFault(op, "depends on %q, which comes later: in sequential mode an operation can only depend on earlier ones", b.ops[d].id)
				}
			}
		}
	} else {
		p.checkCycles(b) // deps hold only valid indexes, whatever else is wrong
	}
}

// resolveGroups gathers the atomicity groups: adjacent operations with the
// same group name, which no operation may have as its id. Each operation
// of a group depends on the one before it, so a group runs in order.
func (p *parser) resolveGroups(b *batch, byID map[string]int, add func(op *operation, j int)) map[string]int {
	var byName map[string]int
	prev := ""
	for _, op := range b.ops {
		name := op.groupName
		if name == "" {
			prev = ""
			continue
		}
		g, seen := byName[name]
		switch {
		case !seen:
			if _, clash := byID[name]; clash {
				p.opFault(op, "atomicityGroup %q is also the id of an operation", short(name))
				continue
			}
			if byName == nil {
				byName = map[string]int{}
			}
			b.groups = append(b.groups, group{name: name})
			g = len(b.groups) - 1
			byName[name] = g
		case prev != name:
			p.opFault(op, "the operations of atomicityGroup %q must be adjacent", short(name))
			continue
		}
		op.group = g + 1
		if n := len(b.groups[g].ops); n > 0 {
			add(op, b.groups[g].ops[n-1])
		}
		b.groups[g].ops = append(b.groups[g].ops, op.index)
		prev = name
	}
	return byName
}

// checkCycles reports each dependency cycle once, naming its operations.
// An operation waits for the one before it of its key to start, as for a
// dependency: one that depends on a later operation of its key would wait
// for itself.
func (p *parser) checkCycles(b *batch) {
	const (
		unvisited = iota
		onPath
		finished
	)
	if !slices.ContainsFunc(b.ops, func(op *operation) bool { return len(op.deps) > 0 }) {
		return // key order alone only ever waits for earlier operations
	}
	keyPrev := keyOrder(b)
	state := make([]int8, len(b.ops))
	pos := make([]int, len(b.ops)) // of an operation on the path
	var path []int
	var byKey []bool // path[k] was reached by the key order of path[k-1]
	// Iterative depth-first search: a long dependency chain must not grow
	// the goroutine stack with the batch. An operation's edges are its
	// dependencies, then the one before it of its key.
	type frame struct{ op, next int }
	for root := range b.ops {
		if state[root] != unvisited {
			continue
		}
		stack := []frame{{op: root}}
		state[root] = onPath
		path, byKey = append(path[:0], root), append(byKey[:0], false)
		pos[root] = 0
		for len(stack) > 0 {
			top := &stack[len(stack)-1]
			deps := b.ops[top.op].deps
			d, viaKey := -1, false
			switch {
			case top.next < len(deps):
				d = deps[top.next]
			case top.next == len(deps) && keyPrev != nil && keyPrev[top.op] >= 0:
				d, viaKey = keyPrev[top.op], true
			default:
				state[top.op] = finished
				stack = stack[:len(stack)-1]
				path, byKey = path[:len(path)-1], byKey[:len(byKey)-1]
				continue
			}
			top.next++
			switch state[d] {
			case unvisited:
				state[d] = onPath
				stack = append(stack, frame{op: d})
				pos[d] = len(path)
				path, byKey = append(path, d), append(byKey, viaKey)
			case onPath:
				if p.full() {
					continue // counted; naming it would cost the cycle's length
				}
				key := ""
				if viaKey {
					key = b.ops[d].key
				} else if k := slices.Index(byKey[pos[d]+1:], true); k >= 0 {
					key = b.ops[path[pos[d]+1+k]].key
				}
				if key == "" {
					p.opFault(b.ops[d], "dependency cycle: %s", cycleText(b, path[pos[d]:]))
				} else {
					p.opFault(b.ops[d], "dependency cycle: %s, as operations of key %q start in submission order", cycleText(b, path[pos[d]:]), short(key))
				}
			}
		}
	}
}

// keyOrder returns the operation before each one of its key, -1 for none;
// nil when no operation has a key.
func keyOrder(b *batch) []int {
	var prev []int
	var last map[string]int // bounded by the batch, and gone with it
	for i, op := range b.ops {
		if op.key == "" {
			continue
		}
		if prev == nil {
			prev = make([]int, len(b.ops))
			for j := range prev {
				prev[j] = -1
			}
			last = map[string]int{}
		}
		if j, ok := last[op.key]; ok {
			prev[i] = j
		}
		last[op.key] = i
	}
	return prev
}

// cycleText names the operations of a dependency cycle, back to the
// first; a long one by its first few and its length.
func cycleText(b *batch, cycle []int) string {
	const most = 8
	var sb strings.Builder
	for k, i := range cycle[:min(len(cycle), most)] {
		if k > 0 {
			sb.WriteString(" -> ")
		}
		sb.WriteString(short(b.ops[i].id))
	}
	if len(cycle) > most {
		fmt.Fprintf(&sb, " -> … (%d operations)", len(cycle))
	}
	sb.WriteString(" -> ")
	sb.WriteString(short(b.ops[cycle[0]].id))
	return sb.String()
}

// finish checks what holds between operations, once all are parsed.
func (p *parser) finish(b *batch) (*batch, error) {
	if err := p.ctx.Err(); err != nil {
		return nil, err
	}
	p.resolveDeps(b)
	if err := p.errFaults(); err != nil {
		return nil, err
	}
	return b, nil
}
