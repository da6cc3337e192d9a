package batch

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/tidwall/gjson"
)

// The multipart/mixed format of Google's batch API and OData: each part an
// application/http holding one HTTP/1.1 request, its Content-ID the
// operation's id; a nested multipart/mixed part is an OData changeset, an
// atomicity group. Answered multipart/mixed, a part per operation in
// order, changesets nested, a failed changeset as its failure alone (as
// OData says).
type multipartFormat struct{}

var multipartMixed format = multipartFormat{}

func (multipartFormat) name() string { return "multipart" }

// Bounds of the multipart reader, beyond max_body_size and max_ops.
const (
	maxBoundary        = 70       // RFC 2046
	maxPartHeaderBytes = 64 << 10 // the headers of a part or of its request, and its request line
	maxPartHeaders     = 100
)

// multipartBoundary returns the boundary of a multipart/mixed Content-Type,
// "" when ct is not one.
func multipartBoundary(ct string) string {
	mt, params, err := mime.ParseMediaType(ct)
	if err != nil || mt != "multipart/mixed" {
		return ""
	}
	return params["boundary"]
}

// partSplitter finds the parts of a multipart body one at a time, so that
// a reader that stops at a limit leaves the rest unsplit. Delimiters are
// found by one forward search each: linear in the body. Lines may end in
// CRLF or LF.
type partSplitter struct {
	body  []byte
	delim []byte // "\n--boundary": a delimiter starts a line
	i     int    // just after the last delimiter found
	err   string // why the body is malformed, once next has said so
}

// newPartSplitter starts at the first delimiter of body.
func newPartSplitter(body []byte, boundary string) (*partSplitter, string) {
	if boundary == "" || len(boundary) > maxBoundary {
		return nil, fmt.Sprintf("multipart boundary must be 1 to %d characters", maxBoundary)
	}
	s := &partSplitter{body: body, delim: []byte("\n--" + boundary)}
	dash := s.delim[1:]
	if bytes.HasPrefix(body, dash) {
		s.i = len(dash)
	} else if k := bytes.Index(body, s.delim); k >= 0 {
		s.i = k + len(s.delim) // after a preamble, which means nothing
	} else {
		return nil, "multipart body has no part"
	}
	return s, ""
}

// next returns the body of the next part; false at the close delimiter,
// or when the body is malformed (s.err says how).
func (s *partSplitter) next() ([]byte, bool) {
	body, i := s.body, s.i
	if s.err != "" || bytes.HasPrefix(body[i:], []byte("--")) {
		return nil, false // the close delimiter; an epilogue means nothing
	}
	// The rest of the delimiter line: transport padding, then its end.
	for i < len(body) && (body[i] == ' ' || body[i] == '\t') {
		i++
	}
	switch {
	case bytes.HasPrefix(body[i:], []byte("\r\n")):
		i += 2
	case bytes.HasPrefix(body[i:], []byte("\n")):
		i++
	default:
		s.err = "multipart delimiter line has more than the boundary"
		return nil, false
	}
	k := bytes.Index(body[i:], s.delim)
	if k < 0 {
		s.err = "multipart body is not terminated by its close delimiter"
		return nil, false
	}
	s.i = i + k + len(s.delim)
	return bytes.TrimSuffix(body[i:i+k], []byte("\r")), true // the CRLF before a delimiter is the delimiter's
}

// header is one header line as written.
type header struct{ name, value string }

// readHeaders reads header lines up to the blank line that ends them and
// returns them and what follows, or a message.
func readHeaders(b []byte) ([]header, []byte, string) {
	var hs []header
	for n := 0; ; n++ {
		if n > maxPartHeaders {
			return nil, nil, fmt.Sprintf("more than %d headers", maxPartHeaders)
		}
		end := bytes.IndexByte(b, '\n')
		if end < 0 {
			if len(bytes.TrimSpace(b)) == 0 {
				return hs, nil, ""
			}
			return nil, nil, "headers are not ended by a blank line"
		}
		line := bytes.TrimSuffix(b[:end], []byte("\r"))
		b = b[end+1:]
		if len(line) == 0 {
			return hs, b, ""
		}
		if line[0] == ' ' || line[0] == '\t' {
			return nil, nil, "folded header lines are not taken"
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return nil, nil, fmt.Sprintf("header line %q has no colon", short(string(line)))
		}
		hs = append(hs, header{string(name), string(bytes.TrimSpace(value))})
	}
}

func headerValue(hs []header, name string) string {
	for _, h := range hs {
		if strings.EqualFold(h.name, name) {
			return h.value
		}
	}
	return ""
}

// validPartID reports whether a Content-ID can be an operation's id: 1 to
// maxIDLength printable characters ("<uuid + 1>" as Google writes them).
func validPartID(s string) bool {
	if s == "" || len(s) > maxIDLength {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}

func (multipartFormat) decode(r *http.Request, body []byte, lim *rules) (*batch, error) {
	parts, msg := newPartSplitter(body, multipartBoundary(r.Header.Get("Content-Type")))
	if msg != "" {
		return nil, badBatchError{{Index: -1, Message: msg}}
	}
	p := parser{lim: lim, ctx: r.Context(), d: &dialect{validID: validPartID, idRule: "1 to 128 printable characters"}}
	resolver := newURLResolver(r.URL.Path, lim.serviceRoot)
	b := &batch{mode: lim.mode, atomicity: lim.atomicity, urls: &resolver}
	if b.atomicity != atomicNone {
		b.mode = modeSequential // a failure must stop what comes after it
	}
	// Each part an operation, or a changeset of them. Every part is
	// counted as it is split, a changeset's too, and an empty changeset
	// or a malformed part as one: past max_ops the batch is refused before
	// another part is split or its headers read.
	type item struct {
		headers []header
		body    []byte
		group   string
	}
	var items []item
	n := 0
	count := func() error {
		if n++; n > lim.maxOps {
			return tooManyOpsError{n: n, max: lim.maxOps}
		}
		return nil
	}
	for part, ok := parts.next(); ok; part, ok = parts.next() {
		hs, rest, msg := readHeadersBounded(part)
		cs := ""
		if msg == "" {
			cs = multipartBoundary(headerValue(hs, "Content-Type"))
		}
		if cs == "" {
			if err := count(); err != nil {
				return nil, err
			}
			if msg != "" {
				p.batchFault("part %d: %s", n-1, msg)
			} else {
				items = append(items, item{hs, rest, ""})
			}
			continue
		}
		inner, msg := newPartSplitter(rest, cs)
		if msg != "" {
			if err := count(); err != nil {
				return nil, err
			}
			p.batchFault("changeset: %s", msg)
			continue
		}
		empty := true
		for in, ok := inner.next(); ok; in, ok = inner.next() {
			empty = false
			if err := count(); err != nil {
				return nil, err
			}
			ihs, irest, msg := readHeadersBounded(in)
			switch {
			case msg != "":
				p.batchFault("changeset part: %s", msg)
			case multipartBoundary(headerValue(ihs, "Content-Type")) != "":
				p.batchFault("changesets do not nest")
			default:
				items = append(items, item{ihs, irest, cs})
			}
		}
		if inner.err != "" {
			p.batchFault("changeset: %s", inner.err)
		}
		if empty {
			if err := count(); err != nil {
				return nil, err
			}
		}
	}
	if parts.err != "" {
		p.batchFault("%s", parts.err)
	}
	if err := p.errFaults(); err != nil {
		return nil, err
	}
	if err := p.counted(len(items)); err != nil {
		return nil, err
	}
	p.alloc(b, len(items))
	for i, it := range items {
		op := p.newOp()
		op.index, op.id, op.groupName = i, p.defaultID(i), it.group
		p.parseHTTPPart(op, it.headers, it.body, r.Host, &resolver)
		b.ops = append(b.ops, op)
		if !p.goOn(len(b.ops)) {
			break
		}
	}
	return p.finish(b)
}

// readHeadersBounded is readHeaders within maxPartHeaderBytes. The blank
// line is looked for there only: a changeset's part holds all of it.
func readHeadersBounded(part []byte) ([]header, []byte, string) {
	head := part[:min(len(part), maxPartHeaderBytes+len("\r\n\r\n"))]
	end := bytes.Index(head, []byte("\n\n"))
	if crlf := bytes.Index(head, []byte("\r\n\r\n")); crlf >= 0 && (end < 0 || crlf < end) {
		end = crlf
	}
	if end > maxPartHeaderBytes || end < 0 && len(part) > maxPartHeaderBytes {
		return nil, nil, fmt.Sprintf("headers longer than %d bytes", maxPartHeaderBytes)
	}
	return readHeaders(part)
}

// parseHTTPPart turns an application/http part into op: its Content-ID,
// then the request it holds.
func (p *parser) parseHTTPPart(op *operation, partHeaders []header, msg []byte, host string, urls *urlResolver) {
	if ct := headerValue(partHeaders, "Content-Type"); !isMediaType(ct, "application/http") {
		p.opFault(op, "part must be Content-Type: application/http, got %q", short(ct))
		return
	}
	if id := headerValue(partHeaders, "Content-ID"); id != "" {
		op.id = strings.Trim(id, `"`)
		p.checkID(op)
		p.linked = true
	}
	line, rest, _ := bytes.Cut(msg, []byte("\n"))
	if len(line) > maxPartHeaderBytes {
		// Spaces in it become "%20": an 8 MB line allocated 117 MB.
		p.opFault(op, "request line longer than %d bytes", maxPartHeaderBytes)
		return
	}
	method, target, ok := parseRequestLine(string(bytes.TrimSuffix(line, []byte("\r"))))
	if !ok {
		p.opFault(op, "request line %q is not METHOD TARGET HTTP/1.x", short(string(line)))
		return
	}
	hs, body, errMsg := readHeadersBounded(rest)
	if errMsg != "" {
		p.opFault(op, "request: %s", errMsg)
		return
	}
	// The body ends where its Content-Length says, blank lines after it
	// aside; without one, blank lines alone are no body: OData clients
	// put them after GET and DELETE parts, and the API read them as one.
	if cl := headerValue(hs, "Content-Length"); cl != "" {
		if n, err := strconv.Atoi(cl); err == nil && n >= 0 && n <= len(body) && onlyLineEnds(body[n:]) {
			body = body[:n]
		}
	} else if onlyLineEnds(body) {
		body = nil
	}
	op.method = method
	p.checkMethod(op)

	// Absolute-form targets on the batch's own host are origin-form ones.
	if u, err := url.Parse(target); err == nil && u.IsAbs() {
		if !strings.EqualFold(u.Host, host) {
			p.opFault(op, "request target %q is on another host", short(target))
			return
		}
		target = u.EscapedPath()
		if u.RawQuery != "" {
			target += "?" + u.RawQuery
		}
	}
	op.target = urls.resolve(target)

	h := make(http.Header)
	values := map[string][]string{}
	var names []string
	for _, hd := range hs {
		name := http.CanonicalHeaderKey(hd.name)
		switch name {
		case "Host":
			// The batch's own host says nothing new; another would.
			if !strings.EqualFold(hd.value, host) {
				p.opFault(op, "Host %q is not the batch request's", short(hd.value))
			}
			continue
		case "Content-Length":
			if n, err := strconv.Atoi(hd.value); err != nil || n != len(body) {
				p.opFault(op, "Content-Length %s does not match the body's %d bytes", short(hd.value), len(body))
			}
			continue
		case "Accept-Encoding":
			continue // the client reads each part's body as it is
		}
		if _, seen := values[name]; !seen {
			names = append(names, name)
		}
		values[name] = append(values[name], hd.value)
	}
	for _, name := range names {
		p.addHeader(op, h, name, values[name])
	}
	op.header = h
	if len(body) > 0 {
		op.body = body
		// References stand in JSON and text bodies, as in native ones.
		switch ct := h.Get("Content-Type"); {
		case isJSONType(ct) && jsontext.Valid(body, maxJSONDepth):
			p.parseTemplate(op, gjson.ParseBytes(body))
		case ct == "" || isTextType(ct):
			p.parseTemplate(op, gjson.Result{Type: gjson.String, Str: string(body), Raw: string(jsontext.AppendString(nil, string(body)))})
			if op.refs != nil && op.refs.body != nil {
				op.refs.textBody = true // text stays text, even one reference alone
			}
		}
	} else {
		p.parseTemplate(op, gjson.Result{})
	}
	p.checkTemplatedTarget(op)
}

// onlyLineEnds reports whether b holds nothing but CR and LF.
func onlyLineEnds(b []byte) bool {
	return len(bytes.Trim(b, "\r\n")) == 0
}

// parseRequestLine splits "METHOD TARGET HTTP/1.x". OData's examples
// write spaces in targets unencoded ("$filter=Building eq 1"): they are
// taken as %20.
func parseRequestLine(line string) (method, target string, ok bool) {
	method, rest, ok1 := strings.Cut(line, " ")
	i := strings.LastIndexByte(rest, ' ')
	if !ok1 || i <= 0 || method == "" {
		return "", "", false
	}
	if proto := rest[i+1:]; !strings.HasPrefix(proto, "HTTP/1.") || len(proto) != len("HTTP/1.1") {
		return "", "", false
	}
	return method, strings.ReplaceAll(rest[:i], " ", "%20"), true
}

func (multipartFormat) sink(w http.ResponseWriter, r *http.Request, _ *batch) sink {
	s := &multipartSink{w: w, boundary: "batch_" + randomHex()}
	// Only OData V1 to V3 clients send these headers (V4 has
	// OData-Version), and V2 ones (SAP's) fail on a batch answered other
	// than 202, which [MS-ODATA] 2.2.7.6.6 asks for, in batch format 1.0.
	if r.Method == http.MethodPost && (r.Header.Get("DataServiceVersion") != "" || r.Header.Get("MaxDataServiceVersion") != "") {
		s.out.status = http.StatusAccepted
		w.Header().Set("DataServiceVersion", "1.0")
	}
	return s
}

func randomHex() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// multipartSink writes the parts of a multipart answer as results come; a
// changeset's parts wait, encoded, for its end, which decides its shape.
type multipartSink struct {
	w        http.ResponseWriter
	boundary string
	out      chunkWriter
	// group is the changeset being written: its parts, and which of them
	// failed it (-1: none yet) or failed at all.
	group      string
	parts      [][]byte
	failedAt   int
	firstFault int
	// indexed is set on a filtered page of a job's results: each part
	// says its operation's index in a Batch-Index header.
	indexed bool
}

func (s *multipartSink) showIndex() { s.indexed = true }

// appendPart appends the part answering operation i.
func (s *multipartSink) appendPart(dst []byte, i int, op *operation, res *result) []byte {
	if s.indexed {
		dst = append(strconv.AppendInt(append(dst, "Batch-Index: "...), int64(i), 10), "\r\n"...)
	}
	return appendHTTPPart(dst, op, res)
}

func (s *multipartSink) start() {
	if !s.out.started() {
		s.out.start(s.w, "multipart/mixed; boundary="+s.boundary, "")
	}
}

func (s *multipartSink) put(i int, op *operation, res *result) {
	s.start()
	if op.groupName != s.group {
		s.endGroup()
	}
	if op.groupName == "" {
		s.out.buf = s.appendPart(s.appendDelimiter(s.out.buf, s.boundary), i, op, res)
		s.out.maybeWrite()
		return
	}
	if s.group == "" {
		s.group, s.failedAt, s.firstFault = op.groupName, -1, -1
	}
	switch {
	case res.failed() && res.err == "" && s.failedAt < 0:
		s.failedAt = len(s.parts) // what failed the group, not what was skipped for it
	case (res.failed() || res.undone != nil && *res.undone) && s.firstFault < 0:
		s.firstFault = len(s.parts)
	}
	s.parts = append(s.parts, s.appendPart(nil, i, op, res))
}

func (s *multipartSink) appendDelimiter(dst []byte, boundary string) []byte {
	return append(append(append(dst, "--"...), boundary...), "\r\n"...)
}

// endGroup writes the changeset held: nested, or, when one of it failed,
// that failure alone, as OData answers a failed changeset.
func (s *multipartSink) endGroup() {
	if s.group == "" {
		return
	}
	if s.failedAt < 0 {
		s.failedAt = s.firstFault
	}
	if s.failedAt >= 0 {
		s.out.buf = append(s.appendDelimiter(s.out.buf, s.boundary), s.parts[s.failedAt]...)
	} else {
		cs := "changesetresponse_" + randomHex()
		s.out.buf = append(s.appendDelimiter(s.out.buf, s.boundary), "Content-Type: multipart/mixed; boundary="+cs+"\r\n\r\n"...)
		for _, p := range s.parts {
			s.out.buf = append(s.appendDelimiter(s.out.buf, cs), p...)
		}
		s.out.buf = append(s.out.buf, "--"+cs+"--\r\n"...)
	}
	s.group, s.parts = "", s.parts[:0]
	s.out.maybeWrite()
}

func (s *multipartSink) close(summary) {
	s.start()
	s.endGroup()
	s.out.buf = append(s.out.buf, "--"+s.boundary+"--\r\n"...)
	s.out.finish()
}

// responseID is the Content-ID of the answer to a part: Google's
// "<response-X>" for its "<X>", the id itself otherwise, as OData has it.
func responseID(id string) string {
	if len(id) > 2 && id[0] == '<' && id[len(id)-1] == '>' {
		return "<response-" + id[1:]
	}
	return id
}

// Headers of an answer a part does not repeat: they framed the
// sub-response, and a part has its own Content-Length.
var unrepeated = map[string]bool{"Content-Length": true, "Transfer-Encoding": true, "Connection": true, "Keep-Alive": true, "Trailer": true}

// appendHTTPPart appends one application/http part (after its delimiter
// line) holding the answer to op: a full status line, its headers, a Content-Length (clients need a
// header line even for an empty answer), and the body as the API sent it.
func appendHTTPPart(dst []byte, op *operation, res *result) []byte {
	status, body, header := res.status, res.body, res.header
	if res.err != "" || res.undone != nil && *res.undone {
		msg := res.err
		if msg == "" {
			status, msg = statusSkipped, "rolled back: its changeset failed"
		}
		body = appendErrorObject(nil, status, msg, nil)
		header = http.Header{"Content-Type": {"application/json"}}
	}
	dst = append(dst, "Content-Type: application/http\r\nContent-ID: "...)
	dst = append(dst, responseID(op.id)...)
	dst = append(dst, "\r\n\r\nHTTP/1.1 "...)
	dst = strconv.AppendInt(dst, int64(status), 10)
	dst = append(dst, ' ')
	if text := http.StatusText(status); text != "" {
		dst = append(dst, text...)
	} else {
		dst = append(dst, "Status"...) // clients want a reason phrase
	}
	dst = append(dst, "\r\n"...)
	var arr [16]string
	for _, name := range sortedNames(arr[:0], header) {
		if unrepeated[name] {
			continue
		}
		for _, v := range header[name] {
			dst = append(dst, name...)
			dst = append(dst, ": "...)
			dst = append(dst, v...)
			dst = append(dst, "\r\n"...)
		}
	}
	dst = append(dst, "Content-Length: "...)
	dst = strconv.AppendInt(dst, int64(len(body)), 10)
	dst = append(dst, "\r\n\r\n"...)
	dst = append(dst, body...)
	return append(dst, "\r\n"...)
}

func (multipartFormat) refuse(w http.ResponseWriter, status int, msg string, faults badBatchError) error {
	writeJSON(w, status, appendErrorObject(nil, status, msg, faults))
	return nil
}
