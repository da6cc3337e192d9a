package batch

import (
	"bytes"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/tidwall/gjson"
	"golang.org/x/net/http/httpguts"
)

// References: {{ID.status}}, {{ID.headers.NAME}}, {{ID.body}} and
// {{ID.body.GJSON_PATH}} in an operation's path, header values and body
// strings stand for parts of the answer of operation ID.

// What a reference points at.
const (
	refStatus = iota
	refHeader
	refBody
	refLocation // the Location of the answer, as an origin-form target
)

// ref is one reference, as written and resolved to an operation index.
type ref struct {
	raw  string // "{{...}}" as written, for error messages
	id   string
	op   int // index of the operation referred to
	kind int
	arg  string // header name, or GJSON path ("" for the whole body)
	// parts counts the components of a GJSON path: each lookup may walk
	// the answer once per component.
	parts int
}

// piece is a run of literal text or one reference; a template is a list of
// them.
type piece struct {
	lit string
	ref *ref
}

// refTemplate holds the parts of an operation that have references. An
// operation without any has none and is sent byte for byte as written.
type refTemplate struct {
	target  []piece
	headers []headerTemplate
	body    []bodySegment
	// textBody is set when the body was written as a JSON string: it is
	// text, and references are inserted into it as text.
	textBody bool
}

type headerTemplate struct {
	name  string
	index int // which of the header's values
	value []piece
}

// bodySegment is a run of raw JSON copied as is, or one JSON string value
// with references in it.
type bodySegment struct {
	raw []byte
	str []piece
}

// all lists every reference of the template.
func (t *refTemplate) all() []*ref {
	var out []*ref
	add := func(ps []piece) {
		for _, p := range ps {
			if p.ref != nil {
				out = append(out, p.ref)
			}
		}
	}
	add(t.target)
	for _, h := range t.headers {
		add(h.value)
	}
	for _, s := range t.body {
		add(s.str)
	}
	return out
}

// maxRefPart bounds what follows the id in a reference: "headers.NAME" or
// "body.PATH". Closing braces are looked for no further, so that parsing
// stays linear in the body, whatever runs of "{{" it holds.
const maxRefPart = 256

// maxRefComponents bounds the components (and array walks) of one
// reference's GJSON path: each may scan the whole answer.
const maxRefComponents = 16

// parsePieces splits s at its references. It returns nil when s has none,
// and a message when a reference is malformed. Text in {{ }} that does not
// start with an id and a dot is no reference and stays as written.
func parsePieces(s string) ([]piece, string) {
	if !strings.Contains(s, "{{") {
		return nil, ""
	}
	lastClose := strings.LastIndex(s, "}}")
	var out []piece
	lit := 0 // where the literal text not yet in out starts
	found := false
	for i := 0; ; {
		k := strings.Index(s[i:], "{{")
		if k < 0 {
			break
		}
		i += k
		if lastClose < i+2 {
			break // no "}}" after it: the rest is text
		}
		// An id, then a dot; id bytes hold no '}', so this stops before
		// the first "}}" as a search for it would.
		start, j := i+2, i+2
		for j < len(s) && j-start <= maxIDLength && idByte(s[j]) {
			j++
		}
		if j == start || j-start > maxIDLength || j == len(s) || s[j] != '.' {
			i += 2
			continue
		}
		window := s[j+1 : min(len(s), j+1+maxRefPart+2)]
		e := strings.Index(window, "}}")
		if e < 0 {
			return nil, fmt.Sprintf("reference %s is not closed within %d bytes of its id", short(s[i:]), maxRefPart)
		}
		r := &ref{raw: s[i : j+1+e+2], id: s[start:j]}
		switch part := window[:e]; {
		case part == "status":
			r.kind = refStatus
		case part == "location":
			r.kind = refLocation
		case part == "body":
			r.kind = refBody
		case strings.HasPrefix(part, "body."):
			r.kind, r.arg = refBody, part[len("body."):]
			var msg string
			if r.parts, msg = checkRefPath(r.arg); msg != "" {
				return nil, fmt.Sprintf("reference %s: %s", short(r.raw), msg)
			}
		case strings.HasPrefix(part, "headers.") && httpguts.ValidHeaderFieldName(part[len("headers."):]):
			r.kind, r.arg = refHeader, http.CanonicalHeaderKey(part[len("headers."):])
		default:
			return nil, fmt.Sprintf("reference %s must be {{ID.status}}, {{ID.location}}, {{ID.headers.NAME}}, {{ID.body}} or {{ID.body.PATH}}", short(r.raw))
		}
		if i > lit {
			out = append(out, piece{lit: s[lit:i]})
		}
		out = append(out, piece{ref: r})
		found = true
		i += len(r.raw)
		lit = i
	}
	if !found {
		return nil, ""
	}
	if lit < len(s) {
		out = append(out, piece{lit: s[lit:]})
	}
	return out, ""
}

// idByte reports whether c may stand in an operation id.
func idByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

// checkRefPath refuses what in a GJSON path could cost more than a walk of
// the answer per component: modifiers (@pretty, @fromstr … recurse over
// what they make, unbounded by the answer's checked depth) and paths of
// more than maxRefComponents parts.
func checkRefPath(p string) (parts int, msg string) {
	parts = 1
	inString := false
	for i := 0; i < len(p); i++ {
		switch c := p[i]; {
		case c == '\\':
			i++
		case c == '"':
			inString = !inString
		case inString:
		case c == '@':
			return 0, `GJSON modifiers (@...) are not allowed; write a key starting with @ as \@`
		case c == '.' || c == '|' || c == '#' || c == ',':
			parts++
		}
	}
	if parts > maxRefComponents {
		return 0, fmt.Sprintf("path has more than %d components", maxRefComponents)
	}
	return parts, ""
}

// probeTarget stands a harmless segment in for each reference of a target
// that starts with literal text, so that its shape can be checked before
// the references are known.
func probeTarget(ps []piece) string {
	var sb strings.Builder
	for _, p := range ps {
		if p.ref == nil {
			sb.WriteString(p.lit)
		} else {
			sb.WriteString("x")
		}
	}
	return sb.String()
}

// parseTemplate finds the references of op. body is the operation's body
// as written in the batch (raw JSON), or the zero Result.
func (p *parser) parseTemplate(op *operation, body gjson.Result) {
	var t refTemplate
	var msg string
	if t.target, msg = parsePieces(op.target); msg != "" {
		p.opFault(op, "path: %s", msg)
	}
	t.headers = p.headerTemplates(op, parsePieces)
	if body.Exists() && strings.Contains(body.Raw, "{{") {
		if body.Type == gjson.String {
			// A text body: references are inserted as text, but a body that
			// is exactly one reference is that value, with its type.
			ps, msg := parsePieces(body.Str)
			if msg != "" {
				p.opFault(op, "body: %s", msg)
			}
			if ps != nil {
				whole := len(ps) == 1 && ps[0].ref != nil
				t.body, t.textBody = []bodySegment{{str: ps}}, !whole
			}
		} else if t.body, msg = jsonTemplate([]byte(body.Raw)); msg != "" {
			p.opFault(op, "body: %s", msg)
		}
	}
	if t.target != nil || t.headers != nil || t.body != nil {
		tt := t // only a template with references goes to the heap
		op.refs = &tt
		p.linked = true
	}
}

// headerTemplates splits op's header values with parse (references, or
// item references), those that hold any; a fault names its header.
func (p *parser) headerTemplates(op *operation, parse func(string) ([]piece, string)) []headerTemplate {
	var out []headerTemplate
	for name, values := range op.header {
		for i, v := range values {
			ps, msg := parse(v)
			if msg != "" {
				p.opFault(op, "header %s: %s", name, msg)
			}
			if ps != nil {
				out = append(out, headerTemplate{name: name, index: i, value: ps})
			}
		}
	}
	return out
}

// jsonTemplate splits a raw JSON value into raw runs and the string values
// (not keys) that hold references.
func jsonTemplate(raw []byte) ([]bodySegment, string) {
	return jsonTemplateOf(raw, parsePieces)
}

// jsonTemplateOf is jsonTemplate for the references that parse finds.
func jsonTemplateOf(raw []byte, parse func(string) ([]piece, string)) ([]bodySegment, string) {
	var segs []bodySegment
	last := 0
	for i := 0; i < len(raw); i++ {
		if raw[i] != '"' {
			continue
		}
		end := i + 1
		for end < len(raw) && raw[end] != '"' {
			if raw[end] == '\\' {
				end++
			}
			end++
		}
		end++ // past the closing quote
		tok := raw[i:end]
		k := end
		for k < len(raw) && (raw[k] == ' ' || raw[k] == '\t' || raw[k] == '\n' || raw[k] == '\r') {
			k++
		}
		isKey := k < len(raw) && raw[k] == ':'
		if !isKey && bytes.Contains(tok, []byte("{{")) {
			ps, msg := parse(gjson.ParseBytes(tok).Str)
			if msg != "" {
				return nil, msg
			}
			if ps != nil {
				if i > last {
					segs = append(segs, bodySegment{raw: raw[last:i]})
				}
				segs = append(segs, bodySegment{str: ps})
				last = end
			}
		}
		i = end - 1
	}
	if segs == nil {
		return nil, ""
	}
	if last < len(raw) {
		segs = append(segs, bodySegment{raw: raw[last:]})
	}
	return segs, ""
}

// unresolvedError is a reference that cannot be filled in; the operation is
// not run and answers 424.
type unresolvedError struct{ msg string }

func (e unresolvedError) Error() string { return e.msg }

func unresolved(format string, args ...any) error {
	return unresolvedError{msg: fmt.Sprintf(format, args...)}
}

// maxRefScan bounds the answer bytes that the GJSON lookups of one batch's
// references may walk, all together: each lookup may walk the whole answer
// once per path component, and a batch may hold many references.
const maxRefScan = 1 << 30

// refBudget is what filling in references may still cost one batch: bytes
// added to operations (max_reference_size) and answer bytes walked
// (maxRefScan). Parallel workers share it.
type refBudget struct {
	max         int64
	bytes, scan atomic.Int64
}

func (b *refBudget) reset(max int64) {
	b.max = max
	b.bytes.Store(max)
	b.scan.Store(maxRefScan)
}

// add takes n bytes added by references; past the budget, the operation
// is not run.
func (b *refBudget) add(n int) error {
	if b.bytes.Add(-int64(n)) < 0 {
		return unresolved("references would add more than max_reference_size (%d bytes) to this batch", b.max)
	}
	return nil
}

// walk takes n answer bytes walked by a lookup.
func (b *refBudget) walk(n int64) error {
	if b.scan.Add(-n) < 0 {
		return unresolved("references would walk more than %d bytes of answers in this batch", maxRefScan)
	}
	return nil
}

// resolve returns op with its references filled in from results. op itself
// is left as it is: a rollback may be resolved again.
func (rn *runner) resolve(op *operation) (*operation, error) {
	t := op.refs
	if t == nil {
		return op, nil
	}
	out := *op
	if t.target != nil {
		target, err := rn.render(t.target, true)
		if err != nil {
			return nil, err
		}
		u, msg := parseTarget(target)
		if msg != "" {
			return nil, unresolved("after references, %s", msg)
		}
		if rn.h.rules.pathAllow != nil && !rn.h.rules.pathAllow(u) {
			return nil, unresolved("after references, path %q is not allowed here", short(u.Path))
		}
		out.target, out.url = target, u
	}
	if t.headers != nil {
		out.header = op.header.Clone()
		for _, ht := range t.headers {
			v, err := rn.render(ht.value, false)
			if err != nil {
				return nil, err
			}
			if !httpguts.ValidHeaderFieldValue(v) {
				return nil, unresolved("after references, header %s has control characters", ht.name)
			}
			out.header[ht.name][ht.index] = v
		}
	}
	switch {
	case t.textBody:
		s, err := rn.render(t.body[0].str, false)
		if err != nil {
			return nil, err
		}
		out.body = []byte(s)
	case t.body != nil:
		var body []byte
		for _, seg := range t.body {
			switch {
			case seg.raw != nil:
				body = append(body, seg.raw...)
			case len(seg.str) == 1:
				// Exactly one reference: its JSON value, with its type.
				v, err := rn.value(seg.str[0].ref)
				if err != nil {
					return nil, err
				}
				if err := rn.refs.add(len(v.raw)); err != nil {
					return nil, err
				}
				n := len(body)
				body = v.appendJSON(body)
				if err := rn.refs.add(len(body) - n - len(v.raw)); err != nil {
					return nil, err // quoted as a JSON string, it grew
				}
			default:
				s, err := rn.render(seg.str, false)
				if err != nil {
					return nil, err
				}
				n := len(body)
				body = jsontext.AppendString(body, s)
				if err := rn.refs.add(len(body) - n - len(s)); err != nil {
					return nil, err // quoted as a JSON string, it grew
				}
			}
		}
		out.body = body
	}
	return &out, nil
}

// render joins pieces into text. In a target, a referenced value is
// escaped as a path segment before any '?' and as a query component after
// it; a value that starts the target is the path itself (a Location
// header, say) and goes in as is. The whole target is checked again
// afterwards.
func (rn *runner) render(ps []piece, target bool) (string, error) {
	// The values first, counted against the budget, then one allocation:
	// grown by append, a large text would cost five times its size.
	type part struct {
		s string
		b []byte // text as the answer has it, not copied
	}
	parts := make([]part, len(ps))
	n := 0
	inQuery := false
	for i, p := range ps {
		if p.ref == nil {
			parts[i].s = p.lit
			inQuery = inQuery || strings.Contains(p.lit, "?")
			n += len(p.lit)
			continue
		}
		v, err := rn.value(p.ref)
		if err != nil {
			return "", err
		}
		if v.isText && !target {
			parts[i].b = v.raw
		} else {
			s := v.text()
			switch {
			case !target:
			case n == 0:
				inQuery = strings.Contains(s, "?")
			case inQuery:
				s = url.QueryEscape(s)
			default:
				s = url.PathEscape(s)
			}
			parts[i].s = s
		}
		m := len(parts[i].s) + len(parts[i].b)
		if err := rn.refs.add(m); err != nil {
			return "", err // before the next value is made
		}
		n += m
	}
	var sb strings.Builder
	sb.Grow(n)
	for _, p := range parts {
		sb.WriteString(p.s)
		sb.Write(p.b)
	}
	return sb.String(), nil
}

// refValue is the value a reference resolved to. raw may be the answer's
// own bytes: it is read, never changed.
type refValue struct {
	raw    []byte // JSON
	isText bool   // raw is not JSON but text (a non-JSON body)
}

// appendJSON appends the value as JSON.
func (v refValue) appendJSON(dst []byte) []byte {
	if v.isText {
		return jsontext.AppendString(dst, string(v.raw))
	}
	return append(dst, v.raw...)
}

// text returns the value as text: strings without their quotes.
func (v refValue) text() string {
	if !v.isText {
		if r := gjson.ParseBytes(v.raw); r.Type == gjson.String {
			return r.Str
		}
	}
	return string(v.raw)
}

// location returns the Location of the answer res to the operation r
// names, as an origin-form target: resolved against that operation's
// target when relative, stripped of scheme and host when they are the
// batch request's own.
func (rn *runner) location(r *ref, res *result) (string, error) {
	vs := res.header["Location"]
	if len(vs) == 0 {
		return "", unresolved("reference %s: operation %s answered no Location", r.raw, r.id)
	}
	loc, err := url.Parse(vs[0])
	if err != nil {
		return "", unresolved("reference %s: operation %s answered a Location that does not parse", r.raw, r.id)
	}
	abs := loc.IsAbs() || loc.Host != ""
	switch {
	case abs && !strings.EqualFold(loc.Host, rn.conn.host):
		return "", unresolved("reference %s: operation %s answered a Location on another host", r.raw, r.id)
	case !abs && !strings.HasPrefix(loc.Path, "/"):
		if base := rn.b.ops[r.op].url; base != nil {
			loc = base.ResolveReference(loc)
		}
	}
	target := loc.EscapedPath()
	if loc.RawQuery != "" {
		target += "?" + loc.RawQuery
	}
	if rn.b.urls != nil && strings.HasPrefix(target, "/") {
		// The API's paths, as a url of the batch's own would be: under
		// the service root.
		target = rn.b.urls.resolve(target)
	}
	return target, nil
}

// value looks up what r points at in the answer it refers to.
func (rn *runner) value(r *ref) (refValue, error) {
	res := &rn.results[r.op]
	if res.status == 0 {
		return refValue{}, unresolved("reference %s: operation %s has not run", r.raw, r.id)
	}
	if res.failed() {
		return refValue{}, unresolved("reference %s: operation %s failed with status %d", r.raw, r.id, res.status)
	}
	switch r.kind {
	case refStatus:
		return refValue{raw: strconv.AppendInt(nil, int64(res.status), 10)}, nil
	case refHeader:
		vs, ok := res.header[r.arg]
		if !ok {
			return refValue{}, unresolved("reference %s: operation %s has no header %s", r.raw, r.id, r.arg)
		}
		return refValue{raw: []byte(strings.Join(vs, ", ")), isText: true}, nil
	case refLocation:
		target, err := rn.location(r, res)
		return refValue{raw: []byte(target), isText: true}, err
	}
	if r.arg == "" {
		return refValue{raw: res.body, isText: !res.isJSON}, nil
	}
	if !res.isJSON {
		return refValue{}, unresolved("reference %s: operation %s did not answer JSON", r.raw, r.id)
	}
	if err := rn.refs.walk(int64(len(res.body)) * int64(r.parts)); err != nil {
		return refValue{}, err
	}
	v := gjson.GetBytes(res.body, r.arg)
	if !v.Exists() {
		return refValue{}, unresolved("reference %s: no %q in the answer of operation %s", r.raw, r.arg, r.id)
	}
	return refValue{raw: []byte(v.Raw)}, nil
}

// keep marks what of op's answer reference r reads.
func (op *operation) keep(r *ref) {
	switch r.kind {
	case refHeader, refLocation:
		op.keepHeader = true
	case refBody:
		op.keepBody = true
		op.keepHeader = true // the body is read by its Content-Type
	}
}

// checkTemplatedTarget checks op's target, once its references are known.
func (p *parser) checkTemplatedTarget(op *operation) {
	switch {
	case op.refs == nil || op.refs.target == nil:
		op.url = p.checkTarget(op, op.target)
	case op.refs.target[0].ref == nil:
		p.checkTarget(op, probeTarget(op.refs.target)) // and again once resolved
	default:
		// A path that starts with a reference ({{a.headers.Location}}) is
		// all checked once resolved.
	}
}
