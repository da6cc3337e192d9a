package batch

import (
	"fmt"
	"net/url"
	"strings"
	"unicode/utf8"

	"github.com/tidwall/gjson"
)

// A job may carry metadata: string pairs its submitter labels it with
// ("source": "crm", "run": "2026-11-22"), echoed with its progress, in the
// list of jobs, in its results summary and in webhooks, and matched by
// the list's ?metadata.<key>=<value>. Bounded as OpenAI's Batch API
// bounds them.
const (
	maxMetadataPairs = 16
	maxMetadataKey   = 64  // bytes
	maxMetadataValue = 512 // bytes
)

// metadataQueryPrefix starts a query parameter that is a metadata pair: of
// a streamed job's submission, or a filter of the list.
const metadataQueryPrefix = "metadata."

// metadataFault says what is wrong with a pair; "" if nothing.
func metadataFault(k, v string) string {
	switch {
	case k == "":
		return "metadata keys must not be empty"
	case len(k) > maxMetadataKey:
		return fmt.Sprintf("metadata key %q is longer than %d bytes", short(k), maxMetadataKey)
	case len(v) > maxMetadataValue:
		return fmt.Sprintf("metadata value of %q is longer than %d bytes", short(k), maxMetadataValue)
	case !utf8.ValidString(k) || !utf8.ValidString(v):
		return fmt.Sprintf("metadata of %q is not valid UTF-8", strings.ToValidUTF8(short(k), "\uFFFD"))
	}
	return ""
}

// tooManyPairs is the fault of metadata of more than maxMetadataPairs.
func tooManyPairs(n int) string {
	return fmt.Sprintf("metadata holds at most %d pairs, got %d", maxMetadataPairs, n)
}

// metadataField reads the batch field metadata: an object of at most
// maxMetadataPairs string pairs.
func (p *parser) metadataField(b *batch, v gjson.Result) {
	if !v.IsObject() {
		p.batchFault("metadata must be an object of strings, got %s", short(v.Raw))
		return
	}
	md := map[string]string{}
	n := 0
	v.ForEach(func(k, val gjson.Result) bool {
		if n++; n > maxMetadataPairs {
			return true // counted, not read
		}
		key := k.String()
		switch _, dup := md[key]; {
		case val.Type != gjson.String:
			p.batchFault("metadata value of %q must be a string, got %s", short(key), short(val.Raw))
		case dup:
			p.batchFault("metadata key %q given twice", short(key))
		default:
			if msg := metadataFault(key, val.Str); msg != "" {
				p.batchFault("%s", msg)
			}
			md[key] = val.Str
		}
		return true
	})
	if n > maxMetadataPairs {
		p.batchFault("%s", tooManyPairs(n))
		return
	}
	if len(md) > 0 {
		b.metadata = md
	}
}

// queryMetadata returns the metadata.<key>=<value> pairs of a query, and
// what is wrong with them ("" if nothing). A key given twice is a fault:
// a job has one value per key.
func queryMetadata(q url.Values) (map[string]string, string) {
	var md map[string]string
	n := 0
	for name := range q {
		if strings.HasPrefix(name, metadataQueryPrefix) {
			n++
		}
	}
	if n > maxMetadataPairs {
		return nil, tooManyPairs(n)
	}
	for name, vals := range q {
		key, ok := strings.CutPrefix(name, metadataQueryPrefix)
		if !ok {
			continue
		}
		if len(vals) > 1 {
			return nil, fmt.Sprintf("metadata key %q given twice", short(key))
		}
		if msg := metadataFault(key, vals[0]); msg != "" {
			return nil, msg
		}
		if md == nil {
			md = map[string]string{}
		}
		md[key] = vals[0]
	}
	return md, ""
}
