package batch

import (
	"bytes"
	"encoding/base64"
	"net/http"
	"path"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/tidwall/gjson"
)

// The JSON batch format of Microsoft Graph ($batch) and OData 4.01:
//
//	{"requests":[{"id":"1","method":"GET","url":"/me","headers":{...},"body":...,
//	              "dependsOn":["0"],"atomicityGroup":"g1"}]}
//
// answered {"responses":[{"id":"1","status":200,"headers":{...},"body":...}]}
// in request order, whole-batch errors {"error":{"code","message","details"}}.
type jsonBatchFormat struct{}

var jsonBatch format = jsonBatchFormat{}

func (jsonBatchFormat) name() string { return "jsonbatch" }

// jsonBatchField returns the bit of a member of a JSON batch request
// object; rollback is caddy-batch's own, as in the native format.
func jsonBatchField(key string) int {
	switch key {
	case "id":
		return fieldID
	case "method":
		return fieldMethod
	case "url":
		return fieldPath
	case "headers":
		return fieldHeaders
	case "body":
		return fieldBody
	case "dependsOn", "depends_on": // Graph's Python SDK writes depends_on, [] for none
		return fieldDependsOn
	case "atomicityGroup":
		return fieldGroup
	case "rollback":
		return fieldRollback
	case "if":
		return fieldIf
	}
	return 0
}

// odataID reports whether s is an OData request identifier: 1 to
// maxIDLength unreserved characters (RFC 3986).
func odataID(s string) bool {
	if s == "" || len(s) > maxIDLength {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !idByte(c) && c != '.' && c != '~' {
			return false
		}
	}
	return true
}

// odataSystemResources are the "$" segments that name no request.
var odataSystemResources = []string{"$batch", "$crossjoin", "$all", "$entity", "$root", "$id", "$metadata"}

// urlResolver turns the url of a JSON batch or multipart request into an
// origin-form target.
type urlResolver struct {
	dir  string // of the batch path: relative urls resolve against it
	root string // the service root absolute paths resolve against
}

// newURLResolver resolves against the batch request's path and the
// configured service root ("" for the directory of the batch path, "/"
// for none).
func newURLResolver(batchPath, root string) urlResolver {
	dir := path.Dir(batchPath)
	if dir == "/" || dir == "." {
		dir = ""
	}
	switch root {
	case "":
		root = dir
	case "/":
		root = ""
	}
	return urlResolver{dir: dir, root: strings.TrimSuffix(root, "/")}
}

// resolve returns the target of u. An absolute path is under the service
// root, as Graph has it ("/me" at /v1.0/$batch is /v1.0/me), unless it is
// there already, as OData has it ("/service/Customers" at /service/$batch).
// A relative path resolves against the batch URL, and one that starts with
// "$ID" stands for the Location of operation ID's answer. What comes out
// is checked as any target is.
func (u urlResolver) resolve(s string) string {
	switch {
	case s == "" || strings.HasPrefix(s, "//") || strings.Contains(s, "://"):
		return s // refused as not origin-form
	case s[0] == '/':
		if u.root == "" || s == u.root || strings.HasPrefix(s, u.root+"/") || strings.HasPrefix(s, u.root+"?") {
			return s
		}
		return u.root + s
	case s[0] == '$':
		seg, rest := s, ""
		if i := strings.IndexAny(s, "/?"); i >= 0 {
			seg, rest = s[:i], s[i:]
		}
		if !slices.Contains(odataSystemResources, seg) && validID(seg[1:]) {
			return "{{" + seg[1:] + ".location}}" + rest
		}
	}
	return u.dir + "/" + s
}

// jsonBatchBody reads "body" by the operation's Content-Type, as OData
// says: JSON for JSON media types, a string for text, base64url for the
// rest. A body with no Content-Type is JSON, or text when a string.
func jsonBatchBody(p *parser, op *operation, v gjson.Result) (ctype string, refs bool) {
	if !v.Exists() || v.Type == gjson.Null {
		return "", false
	}
	ct := op.header.Get("Content-Type")
	switch {
	case v.Type != gjson.String:
		if ct != "" && !isJSONType(ct) {
			p.opFault(op, "body must be a string (text, or base64url) for Content-Type %s", short(ct))
			return "", false
		}
		op.body = []byte(v.Raw)
		return "application/json", true
	case ct == "" || isTextType(ct):
		op.body = []byte(v.Str)
		return "text/plain; charset=utf-8", true
	case isJSONType(ct):
		op.body = []byte(v.Raw) // a JSON string, as written
		return "", false
	}
	b, err := decodeBase64(v.Str)
	if err != nil {
		p.opFault(op, "body must be base64url for Content-Type %s: %v", short(ct), err)
		return "", false
	}
	op.body = b
	return "", false
}

// decodeBase64 decodes base64url or base64, padded or not.
func decodeBase64(s string) ([]byte, error) {
	s = strings.TrimRight(s, "=")
	if strings.ContainsAny(s, "+/") {
		return base64.RawStdEncoding.DecodeString(s)
	}
	return base64.RawURLEncoding.DecodeString(s)
}

// isMediaType reports whether Content-Type ct is of media type mt,
// whatever its parameters.
func isMediaType(ct, mt string) bool {
	m, _, _ := strings.Cut(ct, ";")
	return strings.EqualFold(strings.TrimSpace(m), mt)
}

// isTextType reports whether a Content-Type is of top-level type text.
func isTextType(ct string) bool {
	return len(ct) >= 5 && strings.EqualFold(ct[:5], "text/")
}

func (jsonBatchFormat) decode(r *http.Request, body []byte, lim *rules) (*batch, error) {
	if problem, _ := jsontext.Check(body, maxJSONDepth); problem != "" {
		return nil, badBatchError{{Index: -1, Message: "batch " + problem}}
	}
	p := parser{lim: lim, ctx: r.Context()}
	resolver := newURLResolver(r.URL.Path, lim.serviceRoot)
	p.d = &dialect{
		field:   jsonBatchField,
		target:  func(_ *parser, _ *operation, u string) string { return resolver.resolve(u) },
		body:    jsonBatchBody,
		validID: odataID,
		idRule:  "1 to 128 letters, digits, '-', '.', '_' or '~'",
	}
	var requests gjson.Result
	var opts batch // the batch fields beside "requests"
	gjson.ParseBytes(body).ForEach(func(k, v gjson.Result) bool {
		switch key := k.String(); {
		case key == "requests" && requests.Exists():
			// Readers differ on which one counts: none does.
			p.batchFault(`field "requests" given twice`)
		case key == "requests":
			requests = v
		case key == "max_failures" || key == "max_failure_rate":
			p.budgetField(&opts, key, v)
		case key == "metadata":
			p.metadataField(&opts, v)
		case strings.HasPrefix(key, "@"): // annotations
		default:
			p.batchFault("unknown field %q", short(key))
		}
		return true
	})
	if !requests.IsArray() {
		p.batchFault(`"requests" must be an array of requests`)
	}
	if err := p.errFaults(); err != nil {
		return nil, err
	}
	if err := p.counted(jsontext.Count(requests)); err != nil {
		return nil, err
	}
	b := &batch{mode: lim.mode, atomicity: lim.atomicity, urls: &resolver,
		maxFailures: opts.maxFailures, maxFailureRate: opts.maxFailureRate, metadata: opts.metadata}
	if b.atomicity != atomicNone {
		b.mode = modeSequential // a failure must stop what comes after it
	}
	p.alloc(b, jsontext.Count(requests))
	p.parseEach(b, requests, func(v gjson.Result, op *operation) {
		if !v.Get("id").Exists() {
			p.opFault(op, "id is required")
		}
	})
	return p.finish(b)
}

func (jsonBatchFormat) sink(w http.ResponseWriter, _ *http.Request, b *batch) sink {
	return &jsonBatchSink{w: w}
}

// jsonBatchSink writes {"responses":[...]} as results come, in chunks.
type jsonBatchSink struct {
	w       http.ResponseWriter
	out     chunkWriter
	indexed bool // each response says its index (a filtered page of a job)
}

func (s *jsonBatchSink) showIndex() { s.indexed = true }

func (s *jsonBatchSink) put(i int, op *operation, res *result) {
	if !s.out.started() {
		s.out.start(s.w, "application/json", `{"responses":[`)
	} else {
		s.out.buf = append(s.out.buf, ',')
	}
	if s.indexed {
		s.out.buf = strconv.AppendInt(append(s.out.buf, `{"index":`...), int64(i), 10)
		s.out.buf = append(s.out.buf, ',')
		n := len(s.out.buf)
		s.out.buf = appendJSONBatchResponse(s.out.buf, op, res)
		s.out.buf = append(s.out.buf[:n], s.out.buf[n+1:]...) // its '{'
	} else {
		s.out.buf = appendJSONBatchResponse(s.out.buf, op, res)
	}
	s.out.maybeWrite()
}

// close ends the answer; on a page of a job's results, with what follows
// it, and OData's next link to it.
func (s *jsonBatchSink) close(sum summary) {
	if !s.out.started() {
		s.out.start(s.w, "application/json", `{"responses":[`)
	}
	s.out.buf = append(s.out.buf, ']')
	if p := sum.page; p != nil {
		s.out.buf = appendFollows(s.out.buf, p)
		if p.next >= 0 {
			s.out.buf = jsontext.AppendString(append(s.out.buf, `,"@odata.nextLink":`...), p.nextLink)
		}
	}
	s.out.buf = append(s.out.buf, '}')
	s.out.finish()
}

// appendJSONBatchResponse appends one response object as Graph answers
// it, which its SDK needs: header names canonical (OData asks for
// lower-case ones, but the SDK reads "Content-Type" and nothing else),
// the body a JSON value only for application/json (the SDK serializes
// nothing else), text as a string, anything else base64url. An operation
// rolled back because its atomicity group failed is answered 424: OData
// counts every request of a failed group as failed.
func appendJSONBatchResponse(dst []byte, op *operation, res *result) []byte {
	status, msg := res.status, res.err
	if res.undone != nil && *res.undone {
		status, msg = statusSkipped, "rolled back: its atomicity group failed"
	}
	dst = append(dst, `{"id":`...)
	dst = jsontext.AppendString(dst, op.id)
	if op.groupName != "" {
		dst = append(dst, `,"atomicityGroup":`...)
		dst = jsontext.AppendString(dst, op.groupName)
	}
	dst = append(dst, `,"status":`...)
	dst = strconv.AppendInt(dst, int64(status), 10)
	if msg != "" {
		// The batch layer answered: an error object, as the API would.
		dst = append(dst, `,"headers":{"Content-Type":"application/json"},"body":`...)
		return append(appendErrorObject(dst, status, msg, nil), '}')
	}
	if len(res.header) > 0 {
		dst = append(dst, `,"headers":{`...)
		var arr [16]string
		for i, name := range sortedNames(arr[:0], res.header) {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = jsontext.AppendString(dst, name)
			dst = append(dst, ':')
			dst = jsontext.AppendString(dst, strings.Join(res.header[name], ", "))
		}
		dst = append(dst, '}')
	}
	if len(res.body) > 0 {
		dst = append(dst, `,"body":`...)
		switch ct := contentType(res.header); {
		case res.isJSON && isMediaType(ct, "application/json"):
			dst = append(dst, bytes.TrimSpace(res.body)...)
		case (isTextType(ct) || isJSONType(ct)) && utf8.Valid(res.body):
			dst = jsontext.AppendString(dst, string(res.body))
		default:
			dst = append(dst, '"')
			dst = base64.RawURLEncoding.AppendEncode(dst, res.body)
			dst = append(dst, '"')
		}
	}
	return append(dst, '}')
}

// appendErrorObject appends {"error":{"code","message","details"}}, the
// error shape of Graph and OData, for status.
func appendErrorObject(dst []byte, status int, msg string, faults badBatchError) []byte {
	dst = append(dst, `{"error":{"code":`...)
	dst = jsontext.AppendString(dst, strings.ReplaceAll(http.StatusText(status), " ", ""))
	dst = append(dst, `,"message":`...)
	dst = jsontext.AppendString(dst, msg)
	if len(faults) > 0 {
		dst = append(dst, `,"details":[`...)
		for i, f := range faults {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = append(dst, `{"code":"InvalidRequest","message":`...)
			dst = jsontext.AppendString(dst, f.Message)
			if f.Index >= 0 {
				dst = append(dst, `,"target":`...)
				dst = jsontext.AppendString(dst, f.ID)
			}
			dst = append(dst, '}')
		}
		dst = append(dst, ']')
	}
	return append(dst, "}}"...)
}

func (jsonBatchFormat) refuse(w http.ResponseWriter, status int, msg string, faults badBatchError) error {
	writeJSON(w, status, appendErrorObject(nil, status, msg, faults))
	return nil
}
