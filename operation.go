package batch

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/tidwall/gjson"
)

// Execution modes and atomicity levels, as written in config and on the wire.
const (
	modeSequential = "sequential"
	modeParallel   = "parallel"

	atomicNone         = "none"
	atomicStopOnError  = "stop_on_error"
	atomicAllOrNothing = "all_or_nothing"
)

// maxIDLength bounds an operation id; ids appear in every result and log line.
const maxIDLength = 128

// maxJSONDepth bounds nesting in a batch body, so that no recursive walk
// over it (ours or gjson's) can be driven into a stack blow-up.
const maxJSONDepth = 64

// batch is a parsed and validated batch request.
type batch struct {
	format    format // it came in, and is answered, in
	form      int
	ops       []*operation
	mode      string // "" when the request does not say
	atomicity string // "" when the request does not say
	async     bool
	dryRun    bool
	lean      leanOptions
	// maxAttempts is the batch field max_attempts: tries in all of each
	// operation; 0 leaves it to the retry policy.
	maxAttempts int
	// keyConcurrency is the batch field key_concurrency: operations of
	// one key run at once; 0 leaves it to the handler.
	keyConcurrency int
	// maxFailures and maxFailureRate are the batch's failure budget; 0
	// leaves it to the config.
	maxFailures    int
	maxFailureRate float64
	// metadata is the submitter's labels of a job (SPEC §13), echoed with
	// its progress and results; nil for none.
	metadata map[string]string
	// groups are the atomicity groups of a JSON or multipart batch: each
	// runs in order, and a failure in it fails and rolls back all of it.
	groups []group
	// urls resolves the urls of a JSON or multipart batch, Locations
	// referenced ("$1") among them; nil for native batches.
	urls *urlResolver
}

// group is an atomicity group: the indexes of its operations, in order.
type group struct {
	name string
	ops  []int
}

// leanOptions shape the results: no headers, or nothing but id and status
// for operations that succeeded, or one line each.
type leanOptions struct {
	omitSuccess bool // omit_response_on_success
	noHeaders   bool // include_headers: false
	oneLine     bool // NDJSON: bodies compacted
}

// operation is one validated operation of a batch, ready to become a
// sub-request.
type operation struct {
	index  int
	id     string
	method string
	target string   // origin-form request target as written: path and query
	url    *url.URL // target parsed; the first sub-request of the operation takes it
	header http.Header
	body   []byte // bytes to send; nil means no body
	// deps are the indexes of operations that must finish first.
	deps   []int
	depIDs []string // depends_on as written, until all ids are known
	// refs holds the parts with references; nil when there are none.
	refs *refTemplate
	// items holds the parts of a bulk operation with item references;
	// nil when there are none.
	items *itemTemplate
	// key orders the operation among those of the same key (SPEC §14):
	// "" for none.
	key string
	// cond is the operation's "if": it runs only when that holds; nil
	// when it has none. tested is set when another operation's "if"
	// tests this one: its failure is then expected, and stops no
	// stop_on_error or all_or_nothing batch.
	cond   *condition
	tested bool
	// rollback undoes the operation under all_or_nothing.
	rollback *operation
	// source is 1 + the index, in the job a rerun reruns, of the
	// operation this one reruns; 0 for none.
	source int
	// keepHeader and keepBody are set when a later operation or a rollback
	// reads this operation's answer headers or body, which must then be
	// kept until the batch ends.
	keepHeader, keepBody bool
	isRollback           bool
	// group is the operation's atomicity group, 1 + its index in
	// batch.groups; 0 for none. groupName is the group as written.
	group     int
	groupName string
}

// fault is one problem found while validating a batch. Index is -1 for a
// fault of the batch as a whole.
type fault struct {
	Index   int
	ID      string
	Message string
}

// badBatchError lists every fault found in a batch; the client gets 400.
type badBatchError []fault

func (e badBatchError) Error() string {
	msgs := make([]string, len(e))
	for i, f := range e {
		msgs[i] = f.Message
	}
	return "invalid batch: " + strings.Join(msgs, "; ")
}

// tooManyOpsError is a batch over max_ops; the client gets 413.
type tooManyOpsError struct{ n, max int }

func (e tooManyOpsError) Error() string {
	return fmt.Sprintf("batch has %d operations, more than the %d allowed", e.n, e.max)
}

// rules are the parts of the handler's config that validation needs.
type rules struct {
	mode      string // default mode
	atomicity string // default atomicity
	maxOps    int
	methods   map[string]struct{}
	pathAllow func(*url.URL) bool // nil allows every path
	forwarded map[string]struct{} // forwarded headers an operation may set
	// serviceRoot is what absolute paths of JSON and multipart batches
	// resolve against: "" for the directory of the batch path.
	serviceRoot string
	// firstID is the default id of the first operation: a chunk of a
	// streamed job numbers its operations on from those before it.
	firstID int
	// maxRefSize is max_reference_size: what references, and item
	// templates, may add to a batch.
	maxRefSize int64
	// sources is set for the operations of a rerun, which alone may carry
	// source_index: a client cannot claim one.
	sources bool
}

// maxFaults bounds the faults listed, so that a small batch cannot make a
// large answer; the rest are counted.
const maxFaults = 100

// parser collects faults while it walks a batch.
type parser struct {
	lim     *rules
	d       *dialect        // the format's operation objects; nil for native ones
	ctx     context.Context // ends when the client goes away
	faults  badBatchError
	dropped int // faults past maxFaults
	// linked is set once an operation names itself, another one, or an
	// answer: only then are ids looked up.
	linked bool
	// items is what item templates may still cost the batch.
	items itemBudget
	// Operations, their URLs and their default ids come from one
	// allocation each per batch. An operation's URL is its own: its
	// sub-request takes it.
	ops  []operation
	urls []url.URL
	ids  []string
}

// counted refuses a batch of n operations when there are none or too many,
// before any is parsed, so that an oversized batch costs nothing.
func (p *parser) counted(n int) error {
	if n == 0 {
		return badBatchError{{Index: -1, Message: "batch has no operations"}}
	}
	if n > p.lim.maxOps {
		return tooManyOpsError{n: n, max: p.lim.maxOps}
	}
	return nil
}

// alloc makes room in b for n operations, taken from one allocation each
// for operations, URLs and default ids (and one more: a bulk template).
func (p *parser) alloc(b *batch, n int) {
	b.ops = make([]*operation, 0, n)
	p.ops = make([]operation, n+1)
	p.urls = make([]url.URL, n+1)
	if n > 100 && p.lim.firstID == 0 {
		p.ids = indexIDs(n)
	}
}

// parseEach parses the operation objects of list into b; check, when set,
// looks at each object and its operation for what its format requires.
func (p *parser) parseEach(b *batch, list gjson.Result, check func(v gjson.Result, op *operation)) {
	list.ForEach(func(_, v gjson.Result) bool {
		op := p.parseOperation(len(b.ops), v, kindOp)
		if check != nil {
			check(v, op)
		}
		b.ops = append(b.ops, op)
		return p.goOn(len(b.ops))
	})
}

// goOn reports whether parsing goes on after n operations: not once the
// client is gone, looked at every so often.
func (p *parser) goOn(n int) bool {
	return n%256 != 0 || p.ctx.Err() == nil
}

// newOp returns a zeroed operation, from the batch's slab while it lasts.
func (p *parser) newOp() *operation {
	if len(p.ops) == 0 {
		return new(operation)
	}
	op := &p.ops[0]
	p.ops = p.ops[1:]
	return op
}

// defaultID returns the id of the operation at index i that gives none.
func (p *parser) defaultID(i int) string {
	if p.lim.firstID > 0 {
		return strconv.Itoa(p.lim.firstID + i)
	}
	if i >= 0 && i < len(p.ids) {
		return p.ids[i]
	}
	return strconv.Itoa(i) // no allocation below 100
}

// indexIDs returns "0" to "n-1" as slices of one string.
func indexIDs(n int) []string {
	buf := make([]byte, 0, n*len(strconv.Itoa(n)))
	ends := make([]int, n)
	for i := range n {
		buf = strconv.AppendInt(buf, int64(i), 10)
		ends[i] = len(buf)
	}
	all := string(buf)
	ids := make([]string, n)
	start := 0
	for i, end := range ends {
		ids[i], start = all[start:end], end
	}
	return ids
}

// full reports whether no more faults are listed, counting one more.
func (p *parser) full() bool {
	if len(p.faults) < maxFaults {
		return false
	}
	p.dropped++
	return true
}

// errFaults returns the faults found, nil if none.
func (p *parser) errFaults() error {
	if len(p.faults) == 0 {
		return nil
	}
	if p.dropped > 0 {
		p.faults = append(p.faults, fault{Index: -1, Message: fmt.Sprintf("and %d more faults", p.dropped)})
		p.dropped = 0
	}
	return p.faults
}

// maxEcho bounds a value of the batch that a fault repeats: quoted in full,
// a 2 MB id and a hundred unknown fields made a 200 MB answer. A valid id
// fits.
const maxEcho = maxIDLength

// maxFaultMessage bounds one fault's message, whatever it quotes.
const maxFaultMessage = 4 * maxEcho

// short returns s cut to maxEcho bytes.
func short(s string) string { return cut(s, maxEcho) }

// cut returns s cut to n bytes at a rune boundary, marked "…" when it was
// cut.
func cut(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

func (p *parser) batchFault(format string, args ...any) {
	if p.full() {
		return
	}
	p.faults = append(p.faults, fault{Index: -1, Message: cut(fmt.Sprintf(format, args...), maxFaultMessage)})
}

func (p *parser) opFault(op *operation, format string, args ...any) {
	if p.full() {
		return
	}
	msg := fmt.Sprintf(format, args...)
	if op.isRollback && !strings.HasPrefix(msg, "rollback: ") {
		msg = "rollback: " + msg
	}
	p.faults = append(p.faults, fault{Index: op.index, ID: short(op.id), Message: cut(msg, maxFaultMessage)})
}

// Operation fields. Aliases map onto the same bit, so that giving both
// "path" and "url" is caught as a duplicate.
const (
	fieldID = 1 << iota
	fieldMethod
	fieldPath
	fieldHeaders
	fieldBody
	fieldBodyEncoding
	fieldDependsOn
	fieldRollback
	fieldGroup // JSON batch: atomicityGroup
	fieldIf
	fieldKey
)

// dialect is how a format writes operation objects where it differs from
// the native one: the fields it takes, how a url becomes an origin-form
// target, how a body becomes bytes, what an id may be.
type dialect struct {
	field  func(key string) int
	target func(p *parser, op *operation, url string) string
	// body sets op.body from v, knowing op's headers, and returns the
	// Content-Type to add unless op has one, and whether the body may
	// hold references.
	body    func(p *parser, op *operation, v gjson.Result) (ctype string, refs bool)
	validID func(id string) bool
	idRule  string // what validID asks, for faults
}

// rollbackFields are the fields a rollback operation may have.
const rollbackFields = fieldMethod | fieldPath | fieldHeaders | fieldBody | fieldBodyEncoding

// Kinds of operation objects, which differ in the fields they take.
const (
	kindOp       = iota // an operation of the batch
	kindBulk            // the operation of the bulk form: bodies come from "items"
	kindRollback        // the rollback of an operation
)

// parseOperation validates one operation.
func (p *parser) parseOperation(index int, v gjson.Result, kind int) *operation {
	op := p.newOp()
	op.index, op.id, op.method = index, p.defaultID(index), http.MethodGet
	return p.parseOp(op, v, kind)
}

func (p *parser) parseOp(op *operation, v gjson.Result, kind int) *operation {
	if !v.IsObject() {
		p.opFault(op, "operation must be a JSON object")
		return op
	}
	var seen int
	var idSet bool
	var body, encoding, headers, deps, rollback gjson.Result
	v.ForEach(func(k, val gjson.Result) bool {
		key := k.String()
		if key == "source_index" && p.lim.sources && kind == kindOp {
			p.parseSource(op, val)
			return true
		}
		bit := p.field(key)
		switch {
		case bit == 0:
			p.opFault(op, "unknown field %q", short(key))
			return true
		case kind == kindRollback && bit&rollbackFields == 0:
			p.opFault(op, "rollback: field %q has no place in a rollback", short(key))
			return true
		case seen&bit != 0:
			p.opFault(op, "field %q given twice (or with an alias)", short(key))
			return true
		}
		seen |= bit
		switch bit {
		case fieldID:
			if val.Type != gjson.String {
				p.opFault(op, "%s must be a string, got %s", key, short(val.Raw))
				return true
			}
			op.id, idSet = val.Str, true
		case fieldMethod:
			if val.Type != gjson.String {
				p.opFault(op, "method must be a string, got %s", short(val.Raw))
				return true
			}
			op.method = val.Str // checked and upper-cased by checkMethod
		case fieldPath:
			if val.Type != gjson.String {
				p.opFault(op, "%s must be a string, got %s", key, short(val.Raw))
				return true
			}
			op.target = val.Str
			if p.d != nil {
				op.target = p.d.target(p, op, val.Str)
			}
		case fieldIf:
			p.parseIf(op, val, kind)
		case fieldKey:
			if val.Type != gjson.String || len(val.Str) > maxKeyLength {
				p.opFault(op, "key must be a string of at most %d bytes, got %s", maxKeyLength, short(val.Raw))
				return true
			}
			op.key = val.Str
		case fieldGroup:
			if val.Type != gjson.String || !p.d.validID(val.Str) {
				p.opFault(op, "%s must be a %s, got %s", key, p.d.idRule, short(val.Raw))
				return true
			}
			op.groupName = val.Str
			p.linked = true
		case fieldHeaders:
			headers = val
		case fieldBody:
			body = val
		case fieldBodyEncoding:
			encoding = val
		case fieldDependsOn:
			deps = val
		case fieldRollback:
			rollback = val
		}
		return true
	})
	if idSet {
		p.checkID(op)
		p.linked = true
	}
	p.checkMethod(op)
	op.header = p.parseHeaders(op, headers)
	ctype, refs := "", kind != kindBulk
	switch {
	case kind == kindBulk:
		p.parseItemTemplate(op, body, encoding)
	case p.d != nil:
		ctype, refs = p.d.body(p, op, body)
	default:
		ctype = p.parseBody(op, body, encoding)
	}
	// A target with references is checked with them, as far as it can be
	// before they are resolved.
	templated := kind != kindBulk && strings.Contains(op.target, "{{")
	switch {
	case kind == kindBulk && op.items != nil && op.items.target != nil:
		// Checked for each item; what comes before the first item
		// reference, now.
		if op.items.target[0].ref == nil {
			p.checkTarget(op, probeTarget(op.items.target))
		}
	case !templated:
		op.url = p.checkTarget(op, op.target)
	}
	p.parseDeps(op, deps)
	if kind != kindBulk {
		if !refs {
			body = gjson.Result{}
		}
		p.parseTemplate(op, body)
		if templated {
			p.checkTemplatedTarget(op)
		}
		if t := op.refs; t != nil && t.body != nil && !t.textBody && body.Type == gjson.String {
			ctype = "application/json" // "{{a.body}}": a JSON value, not text
		}
	}
	if ctype != "" && op.header.Get("Content-Type") == "" {
		if op.header == nil {
			op.header = make(http.Header, 1)
		}
		op.header["Content-Type"] = []string{ctype}
	}
	if rollback.Exists() && rollback.Type != gjson.Null {
		switch {
		case kind == kindBulk:
			p.opFault(op, "the operation of a bulk batch cannot have a rollback")
		case kind == kindRollback:
			p.opFault(op, "rollback: a rollback cannot have a rollback")
		default:
			op.rollback = p.parseOp(&operation{index: op.index, id: op.id, method: http.MethodGet, isRollback: true}, rollback, kindRollback)
		}
	}
	return op
}
