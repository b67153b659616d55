//! Content-MD5 on every upload (a PUT of an object or of a part): what
//! S3 Object Lock asks of a write into a bucket with a default retention
//! — "Content-MD5 or x-amz-sdk-checksum-algorithm" (AWS's PutObject
//! documentation; moto refuses the write without one of them, with
//! `MissingUploadObjectWithObjectLockHeaders`).
//!
//! object_store sends the body's SHA-256 (`x-amz-checksum-sha256`, which
//! the store checks) but neither of those headers, and offers no way to
//! add a header to a PUT. The algorithm header is an `x-amz-` header,
//! which SigV4 requires to be signed, and object_store signs a request
//! before its connector sees it; so this connector adds `Content-MD5`, a
//! standard header that need not be signed and that the store checks
//! against the body too. The cost is one MD5 pass over what is uploaded.

use http::Method;
use http::header::HeaderValue;
use http_body_util::BodyExt;
use md5::{Digest, Md5};
use object_store::ClientOptions;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};

const CONTENT_MD5: &str = "content-md5";

/// Connects as object_store's own connector does, through [`ContentMd5`].
#[derive(Debug, Default)]
pub(crate) struct ContentMd5Connector;

impl HttpConnector for ContentMd5Connector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(ContentMd5(inner)))
    }
}

/// Adds `Content-MD5` to every PUT that carries a body (not to copies,
/// whose body is empty and whose source the store checks itself).
#[derive(Debug)]
struct ContentMd5(HttpClient);

#[async_trait::async_trait]
impl HttpService for ContentMd5 {
    async fn call(&self, mut request: HttpRequest) -> Result<HttpResponse, HttpError> {
        if request.method() == Method::PUT
            && !request.headers().contains_key("x-amz-copy-source")
            && !request.headers().contains_key(CONTENT_MD5)
        {
            let mut body = request.body().clone();
            let mut md5 = Md5::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    md5.update(&data);
                }
            }
            let value =
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, md5.finalize());
            let value = HeaderValue::from_str(&value)
                .map_err(|e| HttpError::new(HttpErrorKind::Request, e))?;
            request.headers_mut().insert(CONTENT_MD5, value);
        }
        self.0.execute(request).await
    }
}
