package batch

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/tidwall/gjson"
	"golang.org/x/net/http/httpguts"
)

// Request forms; the answer mirrors the form of the request.
const (
	formArray    = iota // bare array of operations
	formEnvelope        // {"batch": [...], ...}
	formBulk            // {"operation": {...}, "items": [...], ...}
)

// Execution modes and atomicity levels, as written in config and on the wire.
const (
	modeSequential = "sequential"
	modeParallel   = "parallel"

	atomicNone         = "none"
	atomicStopOnError  = "stop_on_error"
	atomicAllOrNothing = "all_or_nothing"
)

// maxJSONDepth bounds nesting in a batch body, so that no recursive walk
// over it (ours or gjson's) can be driven into a stack blow-up.
const maxJSONDepth = 64

// maxIDLength bounds an operation id; ids appear in every result and log line.
const maxIDLength = 128

// batch is a parsed and validated batch request.
type batch struct {
	form      int
	ops       []*operation
	mode      string // "" when the request does not say
	atomicity string // "" when the request does not say
	async     bool
	dryRun    bool
	lean      leanOptions
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
	// tmpl holds the parts with references; nil when there are none.
	tmpl *template
	// rollback undoes the operation under all_or_nothing.
	rollback *operation
	// keepHeader and keepBody are set when a later operation or a rollback
	// reads this operation's answer headers or body, which must then be
	// kept until the batch ends.
	keepHeader, keepBody bool
	isRollback           bool
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

// limits are the parts of the handler's config that validation needs.
type limits struct {
	mode      string // default mode
	atomicity string // default atomicity
	maxOps    int
	methods   map[string]struct{}
	pathAllow func(*url.URL) bool // nil allows every path
	forwarded map[string]struct{} // forwarded headers an operation may set
}

// parseBatch parses and validates a whole batch body. The error is a
// badBatchError, a tooManyOpsError, or ctx's error once the client is gone;
// nothing may run unless it is nil.
func parseBatch(ctx context.Context, body []byte, lim *limits) (*batch, error) {
	msg, topCommas := checkJSON(body)
	if msg != "" {
		return nil, badBatchError{{Index: -1, Message: msg}}
	}
	root := gjson.ParseBytes(body)
	p := parser{lim: lim, ctx: ctx}
	b := &batch{}
	var opsJSON, template gjson.Result
	var items gjson.Result

	switch {
	case root.IsArray():
		b.form = formArray
		opsJSON = root
	case root.IsObject():
		b.form = formEnvelope
		seen := map[string]bool{}
		root.ForEach(func(k, v gjson.Result) bool {
			key := k.String()
			name := key
			if key == "requests" {
				name = "batch"
			}
			if seen[name] {
				p.batchFault("field %q given twice", short(key))
				return true
			}
			seen[name] = true
			switch key {
			case "batch", "requests":
				opsJSON = v
				if !v.IsArray() {
					p.batchFault("%q must be an array of operations", key)
				}
			case "operation":
				template = v
				b.form = formBulk
			case "items":
				items = v
				if !v.IsArray() {
					p.batchFault("\"items\" must be an array")
				}
			case "mode":
				switch s := v.String(); {
				case v.Type == gjson.String && (s == modeSequential || s == modeParallel):
					b.mode = s
				default:
					p.batchFault("mode must be \"sequential\" or \"parallel\", got %s", short(v.Raw))
				}
			case "atomicity":
				switch s := v.String(); {
				case v.Type == gjson.String && (s == atomicNone || s == atomicStopOnError || s == atomicAllOrNothing):
					b.atomicity = s
				default:
					p.batchFault("atomicity must be \"none\", \"stop_on_error\" or \"all_or_nothing\", got %s", short(v.Raw))
				}
			case "async", "dry_run", "omit_response_on_success", "include_headers":
				if !v.IsBool() {
					p.batchFault("%s must be true or false, got %s", key, short(v.Raw))
				}
				switch key {
				case "async":
					b.async = v.Bool()
				case "dry_run":
					b.dryRun = v.Bool()
				case "omit_response_on_success":
					b.lean.omitSuccess = v.Bool()
				case "include_headers":
					b.lean.noHeaders = !v.Bool()
				}
			default:
				p.batchFault("unknown field %q", short(key))
			}
			return true
		})
		switch {
		case b.form == formBulk && opsJSON.Exists():
			p.batchFault("give either \"batch\" or \"operation\" with \"items\", not both")
		case b.form == formBulk && !items.Exists():
			p.batchFault("\"operation\" needs \"items\"")
		case b.form == formEnvelope && items.Exists():
			p.batchFault("\"items\" needs \"operation\"")
		case b.form == formEnvelope && !opsJSON.Exists():
			p.batchFault("missing \"batch\": the array of operations")
		}
	default:
		return nil, badBatchError{{Index: -1, Message: "batch must be a JSON array of operations or an object"}}
	}
	if err := p.errFaults(); err != nil {
		return nil, err
	}

	// Count before parsing any operation, so an oversized batch costs nothing.
	list := opsJSON
	if b.form == formBulk {
		list = items
	}
	var n int
	if b.form == formArray && topCommas > 0 {
		n = topCommas + 1 // counted on the way: no second pass
	} else {
		n = countElements(list)
	}
	if n == 0 {
		return nil, badBatchError{{Index: -1, Message: "batch has no operations"}}
	}
	if n > lim.maxOps {
		return nil, tooManyOpsError{n: n, max: lim.maxOps}
	}

	if b.mode == "" {
		b.mode = lim.mode
	}
	if b.atomicity == "" {
		b.atomicity = lim.atomicity
	}
	if b.atomicity != atomicNone {
		b.mode = modeSequential // a failure must stop what comes after it
	}

	b.ops = make([]*operation, 0, n)
	p.ops = make([]operation, n+1) // and a bulk batch's template
	p.urls = make([]url.URL, n+1)
	if n > 100 {
		p.ids = indexIDs(n)
	}
	if b.form == formBulk {
		p.parseBulk(b, template, items)
	} else {
		list.ForEach(func(_, v gjson.Result) bool {
			b.ops = append(b.ops, p.parseOperation(len(b.ops), v, kindOp))
			return p.goOn(len(b.ops))
		})
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p.resolveDeps(b)
	if err := p.errFaults(); err != nil {
		return nil, err
	}
	return b, nil
}

// maxFaults bounds the faults listed, so that a small batch cannot make a
// large answer; the rest are counted.
const maxFaults = 100

// parser collects faults while it walks a batch.
type parser struct {
	lim     *limits
	ctx     context.Context // ends when the client goes away
	faults  badBatchError
	dropped int // faults past maxFaults
	// linked is set once an operation names itself, another one, or an
	// answer: only then are ids looked up.
	linked bool
	// Operations, their URLs and their default ids come from one
	// allocation each per batch. An operation's URL is its own: its
	// sub-request takes it.
	ops  []operation
	urls []url.URL
	ids  []string
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

// newURL returns a zeroed URL, from the batch's slab while it lasts.
func (p *parser) newURL() *url.URL {
	if len(p.urls) == 0 {
		return new(url.URL)
	}
	u := &p.urls[0]
	p.urls = p.urls[1:]
	return u
}

// defaultID returns the id of the operation at index i that gives none.
func (p *parser) defaultID(i int) string {
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

// short returns s cut to maxEcho bytes at a rune boundary, marked "…" when
// it was cut.
func short(s string) string {
	if len(s) <= maxEcho {
		return s
	}
	i := maxEcho
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i] + "…"
}

func (p *parser) batchFault(format string, args ...any) {
	if p.full() {
		return
	}
	p.faults = append(p.faults, fault{Index: -1, Message: capMessage(fmt.Sprintf(format, args...))})
}

func (p *parser) opFault(op *operation, format string, args ...any) {
	if p.full() {
		return
	}
	msg := fmt.Sprintf(format, args...)
	if op.isRollback && !strings.HasPrefix(msg, "rollback: ") {
		msg = "rollback: " + msg
	}
	p.faults = append(p.faults, fault{Index: op.index, ID: short(op.id), Message: capMessage(msg)})
}

// capMessage cuts msg to maxFaultMessage bytes.
func capMessage(msg string) string {
	if len(msg) <= maxFaultMessage {
		return msg
	}
	i := maxFaultMessage
	for i > 0 && !utf8.RuneStart(msg[i]) {
		i--
	}
	return msg[:i] + "…"
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
)

// opField returns the bit of an operation field, 0 for an unknown one.
func opField(key string) int {
	switch key {
	case "id", "name":
		return fieldID
	case "method":
		return fieldMethod
	case "path", "url", "relative_url":
		return fieldPath
	case "headers":
		return fieldHeaders
	case "body":
		return fieldBody
	case "body_encoding":
		return fieldBodyEncoding
	case "depends_on", "dependsOn":
		return fieldDependsOn
	case "rollback":
		return fieldRollback
	}
	return 0
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
		bit := opField(key)
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
	if kind != kindBulk {
		ctype := p.parseBody(op, body, encoding)
		p.parseTemplate(op, body)
		if t := op.tmpl; t != nil && t.body != nil && !t.textBody && body.Type == gjson.String {
			ctype = "application/json" // "{{a.body}}": a JSON value, not text
		}
		if ctype != "" && op.header.Get("Content-Type") == "" {
			if op.header == nil {
				op.header = make(http.Header, 1)
			}
			op.header["Content-Type"] = []string{ctype}
		}
	} else if body.Exists() {
		p.opFault(op, "the operation of a bulk batch takes its bodies from \"items\"")
	}
	switch {
	case op.tmpl == nil || op.tmpl.target == nil:
		op.url = p.checkTarget(op, op.target)
	case op.tmpl.target[0].ref == nil:
		p.checkTarget(op, probeTarget(op.tmpl.target)) // and again once resolved
	default:
		// A path that starts with a reference ({{a.headers.Location}}) is
		// all checked once resolved.
	}
	p.parseDeps(op, deps)
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

// parseBulk expands {"operation": ..., "items": [...]} into one operation
// per item, all sharing the template's validated method, target and headers.
func (p *parser) parseBulk(b *batch, template, items gjson.Result) {
	tmpl := p.parseOperation(-1, template, kindBulk)
	if len(tmpl.depIDs) > 0 {
		p.opFault(tmpl, "the operation of a bulk batch cannot have depends_on")
	}
	encoding := template.Get("body_encoding")
	// Operations share the template's header map; those whose body needs a
	// default Content-Type share one copy per type.
	headerFor := map[string]http.Header{}
	items.ForEach(func(_, item gjson.Result) bool {
		i := len(b.ops)
		op := p.newOp()
		*op = operation{
			index:  i,
			id:     p.defaultID(i),
			method: tmpl.method,
			target: tmpl.target,
			header: tmpl.header,
		}
		if tmpl.url != nil { // each its own: it becomes the sub-request's
			op.url = p.newURL()
			*op.url = *tmpl.url
		}
		if ctype := p.parseBody(op, item, encoding); ctype != "" && tmpl.header.Get("Content-Type") == "" {
			h, ok := headerFor[ctype]
			if !ok {
				h = tmpl.header.Clone()
				if h == nil {
					h = make(http.Header, 1)
				}
				h["Content-Type"] = []string{ctype}
				headerFor[ctype] = h
			}
			op.header = h
		}
		b.ops = append(b.ops, op)
		return p.goOn(len(b.ops))
	})
}

func (p *parser) checkID(op *operation) {
	if !validID(op.id) {
		p.opFault(op, "id %q must be 1 to %d letters, digits, '_' or '-'", short(op.id), maxIDLength)
	}
}

// validID reports whether id can name an operation. Ids stand in
// references ({{ID.body}}), so they hold no '.', '{' or '}'.
func validID(id string) bool {
	if id == "" || len(id) > maxIDLength {
		return false
	}
	for i := 0; i < len(id); i++ {
		if !idByte(id[i]) {
			return false
		}
	}
	return true
}

func (p *parser) checkMethod(op *operation) {
	// A method is a token, so ASCII: checked before upper-casing, which
	// would fold "poſt" into "POST".
	if !httpguts.ValidHeaderFieldName(op.method) {
		p.opFault(op, "method %q is not a valid HTTP method", short(op.method))
		return
	}
	op.method = strings.ToUpper(op.method)
	if _, ok := p.lim.methods[op.method]; !ok {
		p.opFault(op, "method %s is not allowed here", short(op.method))
	}
}

// checkTarget validates an operation's target and returns it parsed.
func (p *parser) checkTarget(op *operation, target string) *url.URL {
	u := p.newURL()
	msg := parseTargetInto(target, u)
	if msg == "" && p.lim.pathAllow != nil && !p.lim.pathAllow(u) {
		msg = fmt.Sprintf("path %q is not allowed here", short(u.Path))
	}
	if msg != "" {
		p.opFault(op, "%s", msg)
		return nil
	}
	return u
}

// parseTarget checks that t is an origin-form request target that cannot
// be read as another host or escape its path, and parses it. It returns a
// message for the client when t is refused.
func parseTarget(t string) (*url.URL, string) {
	u := new(url.URL)
	if msg := parseTargetInto(t, u); msg != "" {
		return nil, msg
	}
	return u, ""
}

// parseTargetInto is parseTarget writing the parsed target to u, so that
// a batch can parse its operations' targets into one allocation.
func parseTargetInto(t string, u *url.URL) string {
	if t == "" {
		return "path is required"
	}
	if t[0] != '/' || len(t) > 1 && t[1] == '/' {
		return fmt.Sprintf("path must be origin-form, got %q", short(t))
	}
	for i := 0; i < len(t); i++ {
		switch c := t[i]; {
		case c <= ' ' || c == 0x7f:
			return fmt.Sprintf("path must not hold control characters or spaces, got %q", short(t))
		case c == '\\':
			return fmt.Sprintf("path must not hold '\\', got %q", short(t))
		case c == '#':
			return fmt.Sprintf("path must not hold a fragment, got %q", short(t))
		}
	}
	p, query, hasQuery := strings.Cut(t, "?")
	escaped := strings.IndexByte(p, '%') >= 0
	if escaped {
		d, err := url.PathUnescape(p)
		if err != nil {
			return fmt.Sprintf("path has an invalid percent-escape, got %q", short(t))
		}
		// Decode again until stable, so that multiply encoded dot-segments
		// or separators ("%252e%252e") are seen as what a backend that
		// decodes more than once may make of them. Past the first decode a
		// '%' may be plain data ("50%25off" is "50%off"): only valid
		// escapes are decoded. Each round costs the path's length, so a
		// path still changing after maxDecodes rounds is refused: nesting
		// "%2525…" deeper would make validation quadratic.
		rounds := 1
		for p = d; ; rounds++ {
			if d = unescapeValid(p); d == p {
				break
			}
			if rounds == maxDecodes {
				return fmt.Sprintf("path is percent-encoded more than %d times, got %q", maxDecodes, short(t))
			}
			p = d
		}
		for i := 0; i < len(p); i++ {
			if c := p[i]; c < ' ' || c == 0x7f || c == '\\' {
				return fmt.Sprintf("path must not encode control characters or '\\', got %q", short(t))
			}
		}
	}
	if strings.IndexByte(p, '.') >= 0 {
		for seg := range strings.SplitSeq(p, "/") {
			// "..;x" is ".." to servers that take path parameters (Tomcat, Jetty).
			if seg, _, _ = strings.Cut(seg, ";"); seg == "." || seg == ".." {
				return fmt.Sprintf("path must not hold dot-segments, got %q", short(t))
			}
		}
	}
	if escaped || !plainPath(p) {
		parsed, err := url.ParseRequestURI(t)
		if err != nil {
			return fmt.Sprintf("path %q does not parse", short(t))
		}
		*u = *parsed
		return ""
	}
	// What url.ParseRequestURI makes of a path that needs no escaping,
	// without its allocation.
	*u = url.URL{Path: p, RawQuery: query, ForceQuery: hasQuery && query == ""}
	return ""
}

// maxDecodes bounds the rounds of percent-decoding a target is checked
// through: "%25252e" is "." after three.
const maxDecodes = 4

// plainPath reports whether p is a path that URL encoding leaves as it is,
// so that its URL has no RawPath.
func plainPath(p string) bool {
	for i := 0; i < len(p); i++ {
		switch c := p[i]; {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("-_.~$&+,/:;=@", c) >= 0:
		default:
			return false
		}
	}
	return true
}

// unescapeValid decodes the valid %XX escapes of s and leaves the rest.
func unescapeValid(s string) string {
	if !strings.Contains(s, "%") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]) {
			b.WriteByte(unhex(s[i+1])<<4 | unhex(s[i+2]))
			i += 2
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c >= 'a':
		return c - 'a' + 10
	case c >= 'A':
		return c - 'A' + 10
	}
	return c - '0'
}

// Headers an operation may not set: they frame the message or the
// connection, and a batch must not be a way to smuggle them.
var refusedHeaders = map[string]bool{
	"Host": true, "Content-Length": true, "Transfer-Encoding": true,
	"Connection": true, "Upgrade": true, "Keep-Alive": true, "Te": true,
	"Trailer": true,
}

// Headers some frameworks read as the method: they would get past methods.
var methodOverride = map[string]bool{
	"X-Http-Method-Override": true, "X-Http-Method": true, "X-Method-Override": true,
}

// isForwardedHeader reports whether name (canonical) claims a client
// address; such headers are dropped unless allow_forwarded_headers lists them.
func isForwardedHeader(name string) bool {
	return name == "Forwarded" || name == "X-Real-Ip" || strings.HasPrefix(name, "X-Forwarded-")
}

func (p *parser) parseHeaders(op *operation, v gjson.Result) http.Header {
	if !v.Exists() || v.Type == gjson.Null {
		return nil
	}
	if !v.IsObject() {
		p.opFault(op, "headers must be an object, got %s", short(v.Raw))
		return nil
	}
	h := make(http.Header)
	v.ForEach(func(k, val gjson.Result) bool {
		name := k.String()
		if !httpguts.ValidHeaderFieldName(name) {
			p.opFault(op, "header name %q is not a valid token", short(name))
			return true
		}
		name = http.CanonicalHeaderKey(name)
		if refusedHeaders[name] || strings.HasPrefix(name, "Proxy-") || methodOverride[name] {
			p.opFault(op, "header %s may not be set by an operation", short(name))
			return true
		}
		if _, dup := h[name]; dup {
			p.opFault(op, "header %s given twice", short(name))
			return true
		}
		var values []string
		switch {
		case val.Type == gjson.String:
			values = []string{val.Str}
		case val.IsArray():
			val.ForEach(func(_, s gjson.Result) bool {
				if s.Type != gjson.String {
					p.opFault(op, "header %s: values must be strings, got %s", short(name), short(s.Raw))
					return false
				}
				values = append(values, s.Str)
				return true
			})
		default:
			p.opFault(op, "header %s must be a string or an array of strings, got %s", short(name), short(val.Raw))
			return true
		}
		for _, s := range values {
			if !httpguts.ValidHeaderFieldValue(s) {
				p.opFault(op, "header %s has a value with control characters (CR, LF or NUL)", short(name))
				return true
			}
		}
		if isForwardedHeader(name) {
			if _, ok := p.lim.forwarded[name]; !ok {
				return true // dropped: a batch never speaks for another address
			}
		}
		h[name] = values
		return true
	})
	return h
}

// parseBody turns an operation's "body" into the bytes to send, and returns
// the Content-Type that goes with them unless the operation sets one.
func (p *parser) parseBody(op *operation, v, encoding gjson.Result) (ctype string) {
	if encoding.Exists() && (encoding.Type != gjson.String || encoding.Str != "base64") {
		p.opFault(op, "body_encoding must be \"base64\", got %s", short(encoding.Raw))
		return ""
	}
	switch {
	case !v.Exists() || v.Type == gjson.Null:
		if encoding.Exists() && op.index >= 0 {
			p.opFault(op, "body_encoding needs a body")
		}
		return ""
	case v.Type == gjson.String:
		if encoding.Exists() {
			b, err := base64.StdEncoding.DecodeString(v.Str)
			if err != nil {
				p.opFault(op, "body is not valid base64: %v", err)
				return ""
			}
			op.body = b
			ctype = "application/octet-stream"
		} else {
			op.body = []byte(v.Str)
			ctype = "text/plain; charset=utf-8"
		}
	default:
		if encoding.Exists() {
			p.opFault(op, "body_encoding \"base64\" needs a string body")
			return ""
		}
		op.body = []byte(v.Raw)
		ctype = "application/json"
	}
	return ctype
}

func (p *parser) parseDeps(op *operation, v gjson.Result) {
	var ids []string
	switch {
	case !v.Exists() || v.Type == gjson.Null:
	case v.Type == gjson.String:
		ids = []string{v.Str}
	case v.IsArray():
		v.ForEach(func(_, s gjson.Result) bool {
			if s.Type != gjson.String {
				p.opFault(op, "depends_on must hold operation ids (strings), got %s", short(s.Raw))
				return false
			}
			ids = append(ids, s.Str)
			return true
		})
	default:
		p.opFault(op, "depends_on must be an array of operation ids, got %s", short(v.Raw))
	}
	op.depIDs = ids
	p.linked = p.linked || len(ids) > 0
}

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
	addDep := func(op *operation, j int) {
		if added[j] != op.index+1 {
			added[j] = op.index + 1
			op.deps = append(op.deps, j)
		}
	}
	for _, op := range b.ops {
		for _, id := range op.depIDs {
			j, ok := byID[id]
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
		// A reference implies a dependency.
		if op.tmpl != nil {
			for _, r := range op.tmpl.refs() {
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
		if rb := op.rollback; rb != nil && rb.tmpl != nil {
			for _, r := range rb.tmpl.refs() {
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
				if d > op.index {
					p.opFault(op, "depends on %q, which comes later: in sequential mode an operation can only depend on earlier ones", b.ops[d].id)
				}
			}
		}
	} else {
		p.checkCycles(b) // deps hold only valid indexes, whatever else is wrong
	}
}

// keep marks what of op's answer reference r reads.
func (op *operation) keep(r *ref) {
	switch r.kind {
	case refHeader:
		op.keepHeader = true
	case refBody:
		op.keepBody = true
		op.keepHeader = true // the body is read by its Content-Type
	}
}

// checkCycles reports each dependency cycle once, naming its operations.
func (p *parser) checkCycles(b *batch) {
	const (
		unvisited = iota
		onPath
		finished
	)
	state := make([]int8, len(b.ops))
	pos := make([]int, len(b.ops)) // of an operation on the path
	var path []int
	// Iterative depth-first search: a long dependency chain must not grow
	// the goroutine stack with the batch.
	type frame struct{ op, next int }
	for root := range b.ops {
		if state[root] != unvisited {
			continue
		}
		stack := []frame{{op: root}}
		state[root] = onPath
		path = append(path[:0], root)
		pos[root] = 0
		for len(stack) > 0 {
			top := &stack[len(stack)-1]
			deps := b.ops[top.op].deps
			if top.next == len(deps) {
				state[top.op] = finished
				stack = stack[:len(stack)-1]
				path = path[:len(path)-1]
				continue
			}
			d := deps[top.next]
			top.next++
			switch state[d] {
			case unvisited:
				state[d] = onPath
				stack = append(stack, frame{op: d})
				pos[d] = len(path)
				path = append(path, d)
			case onPath:
				if p.full() {
					continue // counted; naming it would cost the cycle's length
				}
				p.opFault(b.ops[d], "dependency cycle: %s", cycleText(b, path[pos[d]:]))
			}
		}
	}
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

// checkJSON returns a message when body is not one valid JSON value in
// UTF-8 within maxJSONDepth, and "" when it is; then commas counts the
// commas that separate the elements of a top-level array.
func checkJSON(body []byte) (msg string, commas int) {
	if !utf8.Valid(body) {
		return "batch is not valid UTF-8", 0
	}
	depth, deepest := 0, 0
	eachStructural(body, func(_ int, c byte) {
		switch c {
		case '{', '[':
			depth++
			deepest = max(deepest, depth)
		case '}', ']':
			depth--
		case ',':
			if depth == 1 {
				commas++
			}
		}
	})
	if deepest > maxJSONDepth {
		return fmt.Sprintf("batch nests JSON deeper than %d levels", maxJSONDepth), 0
	}
	if !gjson.ValidBytes(body) {
		return "batch is not valid JSON", 0
	}
	return "", commas
}

// eachStructural calls fn with each of the bytes {}[], of b that stand
// outside JSON strings, and their offsets. It never recurses.
func eachStructural(b []byte, fn func(i int, c byte)) {
	inString := false
	for i := 0; i < len(b); i++ {
		c := b[i]
		if inString {
			switch c {
			case '\\':
				i++
			case '"':
				inString = false
			}
			continue
		}
		switch c {
		case '"':
			inString = true
		case '{', '[', '}', ']', ',':
			fn(i, c)
		}
	}
}

// countElements counts the elements of a JSON array without decoding them.
func countElements(arr gjson.Result) int {
	n := 0
	arr.ForEach(func(_, _ gjson.Result) bool {
		n++
		return true
	})
	return n
}
